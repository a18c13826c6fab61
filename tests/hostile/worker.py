"""Runs hostile-input cases in one long-lived process (torch is imported once).

Protocol: one JSON request per stdin line ``{"argv": [...] | null, "call": [target, args] | null,
"cwd": DIR, "result": FILE}``; the worker runs ``marginface.cli.main(argv)`` (or calls
``module:function(*args)`` and maps ``UserError`` to exit 2 the way the CLI does), with
stdout/stderr captured at the file-descriptor level, writes ``{"rc", "stdout", "stderr"}`` to
FILE and prints ``DONE`` on its own stdout. An exception that escapes is printed as Python
would (a traceback) and gives rc 1, as it would in a real process. The parent kills and
restarts the worker when a case hangs.

Standalone on purpose (no ``tests`` import), so it can run any checkout's ``marginface``.
"""
import importlib
import io
import json
import os
import sys
import tempfile
import traceback


def _run(request):
    if request.get("argv") is not None:
        from marginface.cli import main

        return main(request["argv"])
    target, args, *then = request["call"]
    module, _, name = target.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    from marginface.errors import UserError

    try:
        result = obj(*args)
        if then:  # [method, method_args]: call a method of what the target returned
            getattr(result, then[0])(*then[1])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def serve():
    control = os.fdopen(os.dup(1), "w", buffering=1)
    import marginface.cli  # noqa: F401  (the costly imports happen once, before the first case)
    import torch

    torch.set_num_threads(1)
    control.write("READY\n")
    for line in sys.stdin:
        request = json.loads(line)
        os.chdir(request["cwd"])
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            saved = os.dup(1), os.dup(2)
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
            sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), line_buffering=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(2), "wb"), line_buffering=True)
            wrappers = sys.stdout, sys.stderr
            try:
                rc = _run(request)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # what the interpreter would print on the way out
                traceback.print_exc()
                rc = 1
            for w in wrappers:
                w.close()
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            out.seek(0), err.seek(0)
            result = {"rc": rc, "stdout": out.read().decode("utf-8", "replace"),
                      "stderr": err.read().decode("utf-8", "replace")}
        with open(request["result"], "w") as f:
            json.dump(result, f)
        control.write("DONE\n")


if __name__ == "__main__":
    serve()
