"""Finds the real Docker engine the docker tests need (started by `make docker-up`, as CI does)."""
import os
import shutil
import subprocess

from tests.util import ROOT

NODE_IMAGE = os.environ.get("TOWF_TEST_NODE_IMAGE", "ty-openworkflow-test/node:local")
PYTHON_IMAGE = os.environ.get("TOWF_TEST_PYTHON_IMAGE", "ty-openworkflow-test/python:local")
# Goes under `adapters:` (TempHome.adapter_config).
DOCKER_CONFIG = ("  docker:\n    enabled: true\n    node_image: %s\n    python_image: %s\n"
                 % (NODE_IMAGE, PYTHON_IMAGE))


def _engine():
    """(True, "") if a docker engine answers and the test images exist, else (False, why)."""
    if not shutil.which("docker"):
        return False, "no docker CLI on PATH (make docker-up installs Debian's docker.io)"
    if not os.environ.get("DOCKER_HOST"):
        try:
            out = subprocess.run(["bash", os.path.join(ROOT, ".ci", "docker-engine.sh"), "env"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out.startswith("DOCKER_HOST="):
            os.environ["DOCKER_HOST"] = out.split("=", 1)[1]
    try:
        rc = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                            timeout=20).returncode
    except (OSError, subprocess.SubprocessError):
        rc = 1
    if rc != 0:
        return False, "no docker engine answers (start one with `make docker-up`, which needs root)"
    for image in (NODE_IMAGE, PYTHON_IMAGE):
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=20).returncode != 0:
            return False, "image %s is missing (make docker-up builds it)" % image
    return True, ""


HAVE_ENGINE, WHY_NOT = _engine()
