"""The vendored diffusers tests run through ``run.py`` (a staged copy), never collected from here."""

collect_ignore_glob = ["vendor/*"]
