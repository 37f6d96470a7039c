"""A pytest plugin of the diffusers-suite runner (``-p freeze_gc``): after collection, every object alive then
(the imported torch, transformers, diffusers and cogvx modules, the test classes) moves to gc's permanent
generation. diffusers' tests call ``gc.collect()`` before and after each test (``cleanup``), and each full
collection otherwise rescans those ~430,000 import-time objects: 0.17 s a call, about half the suite's time on
the 2-core machine. Objects the tests create are still collected by every ``gc.collect()``; no test changes."""

import gc


def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()
