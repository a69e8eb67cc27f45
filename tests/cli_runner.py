"""Run recipes' real command lines quickly: a fork server.

A fresh Python process imports the framework once; for every command it forks a child that runs
`recipes/<name>.py` as `__main__` with that `sys.argv`, exactly as `python recipes/<name>.py ...` would
(Hydra's argument parsing, our checks, the exit code), with stdout and stderr in files. A case then costs
the work of the command, not the ~5 s of importing torch, transformers and lightning again. The server
itself never runs torch, so forking it is safe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER = r"""
import json, os, runpy, sys, traceback
import framework.app, framework.pipeline, framework.evaluate  # the imports every recipe makes
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(request["cwd"])
            out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(err, 2)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            os.environ.update(request["env"])
            sys.argv = [request["script"], *request["args"]]
            runpy.run_path(request["script"], run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class RecipeRunner:
    def __init__(self, env: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})},
        )
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the recipe runner did not start")
        self.scratch = tempfile.mkdtemp(prefix="recipe-runner-")

    def run(self, recipe: str, *args: str, env: dict[str, str] | None = None) -> Result:
        out, err = os.path.join(self.scratch, "stdout"), os.path.join(self.scratch, "stderr")
        request = {"script": f"recipes/{recipe}.py", "args": list(args), "cwd": REPO, "stdout": out, "stderr": err, "env": env or {}}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        with open(out) as f_out, open(err) as f_err:
            return Result(reply["returncode"], f_out.read(), f_err.read())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
