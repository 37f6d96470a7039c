"""diffusers' four CogVideoX pipeline classes on cogvx, with diffusers' ``__call__`` arguments, order and
defaults (text-to-video, image-to-video, video-to-video, Fun-Control); the shared machinery is
``diffusers_compat.CogVideoXPipelineBase``."""

from __future__ import annotations

from .diffusers_compat import CogVideoXPipelineBase

__all__ = ["CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline",
           "CogVideoXFunControlPipeline"]


def _call_signature(extra: str):
    """Docstring shared by the four __call__ methods."""
    return (f"Generate videos with diffusers' arguments and defaults ({extra}); returns "
            "CogVideoXPipelineOutput(frames=...) or, with return_dict=False, (frames,).")


class CogVideoXPipeline(CogVideoXPipelineBase):
    """diffusers' ``CogVideoXPipeline`` on cogvx: text-to-video."""

    def __call__(self, prompt=None, negative_prompt=None, height=None, width=None, num_frames=None,
                 num_inference_steps=50, timesteps=None, guidance_scale=6, use_dynamic_cfg=False,
                 num_videos_per_prompt=1, eta=0.0, generator=None, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, output_type="pil", return_dict=True, attention_kwargs=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=226):
        return self._call(**_locals(locals()))

    __call__.__doc__ = _call_signature("text-to-video")


class CogVideoXImageToVideoPipeline(CogVideoXPipelineBase):
    """diffusers' ``CogVideoXImageToVideoPipeline`` on cogvx: the first frame given as ``image``."""

    checkpoint_task = "i2v"

    def __call__(self, image, prompt=None, negative_prompt=None, height=None, width=None, num_frames=49,
                 num_inference_steps=50, timesteps=None, guidance_scale=6, use_dynamic_cfg=False,
                 num_videos_per_prompt=1, eta=0.0, generator=None, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, output_type="pil", return_dict=True, attention_kwargs=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=226):
        return self._call(**_locals(locals()))

    __call__.__doc__ = _call_signature("image-to-video")


class CogVideoXVideoToVideoPipeline(CogVideoXPipelineBase):
    """diffusers' ``CogVideoXVideoToVideoPipeline`` on cogvx: ``video`` re-noised by ``strength``."""

    def __call__(self, video=None, prompt=None, negative_prompt=None, height=None, width=None,
                 num_inference_steps=50, timesteps=None, strength=0.8, guidance_scale=6, use_dynamic_cfg=False,
                 num_videos_per_prompt=1, eta=0.0, generator=None, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, output_type="pil", return_dict=True, attention_kwargs=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=226):
        if video is None:
            raise ValueError("video= is required for video-to-video")
        return self._call(num_frames=None, **_locals(locals()))

    __call__.__doc__ = _call_signature("video-to-video")


class CogVideoXFunControlPipeline(CogVideoXPipelineBase):
    """diffusers' ``CogVideoXFunControlPipeline`` on cogvx: a pose / depth / edge ``control_video``."""

    checkpoint_task = "control"

    def __call__(self, prompt=None, negative_prompt=None, control_video=None, height=None, width=None,
                 num_inference_steps=50, timesteps=None, guidance_scale=6, use_dynamic_cfg=False,
                 num_videos_per_prompt=1, eta=0.0, generator=None, latents=None, control_video_latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, output_type="pil", return_dict=True,
                 attention_kwargs=None, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 max_sequence_length=226):
        if control_video_latents is not None:
            raise ValueError("control_video_latents is not supported; pass control_video (frames) instead")
        args = _locals(locals())
        del args["control_video_latents"]
        return self._call(num_frames=None, **args)

    __call__.__doc__ = _call_signature("control video")


def _locals(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in ("self", "__class__")}
