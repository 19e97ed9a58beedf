"""``python -m tests.fuzz NAME [libFuzzer flags]``: fuzz one target with its seeds.

NAME is ``rewrite`` or ``edits``. The seeds (realistic bodies, built by the target's
``seeds()``) are written to ``.fuzz/NAME/seeds``; what the fuzzer finds goes to
``.fuzz/NAME/corpus``, and a crashing input to ``.fuzz/NAME/crash-*``. The tokens of
``NAME.dict`` guide its mutations. Any libFuzzer flag passes through, e.g.
``-max_total_time=300``, ``-runs=0`` (the seeds alone) or a crash file to run it once.

``python -m tests.fuzz NAME --lines`` replays the seeds and the corpus under the
standard library's tracer instead, and prints which lines of the code under test
they never ran.
"""

from __future__ import annotations

import dis
import hashlib
import importlib
import inspect
import sys
import trace
from pathlib import Path
from types import CodeType, ModuleType

TARGETS = ("rewrite", "edits")


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        raise SystemExit(f"usage: python -m tests.fuzz {{{','.join(TARGETS)}}} [libFuzzer flags]")
    name, flags = argv[1], argv[2:]
    target = importlib.import_module(f"tests.fuzz.{name}_target")
    home = Path(".fuzz") / name
    seeds, corpus = home / "seeds", home / "corpus"
    for folder in (seeds, corpus):
        folder.mkdir(parents=True, exist_ok=True)
    for seed in target.seeds():
        (seeds / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    if flags == ["--lines"]:
        report_lines(target, [seeds, corpus])
        return
    if not any(flag.startswith("-artifact_prefix=") for flag in flags):
        flags.append(f"-artifact_prefix={home}/")
    if not any(flag.startswith("-dict=") for flag in flags):
        flags.append(f"-dict={Path(__file__).with_name(f'{name}.dict')}")
    # libFuzzer adds to the first folder and only reads the others; an input file
    # given instead of folders is run once (to reproduce a crash).
    inputs = [arg for arg in flags if not arg.startswith("-")]
    flags = [arg for arg in flags if arg.startswith("-")]
    import atheris  # the targets import it too; --lines runs without fuzzing

    target.prepare()
    atheris.Setup([argv[0], *flags, *(inputs or [str(corpus), str(seeds)])], target.test_one_input)
    atheris.Fuzz()


def report_lines(target: ModuleType, folders: list[Path]) -> None:
    inputs = [path.read_bytes() for folder in folders for path in sorted(folder.iterdir())]
    tracer = trace.Trace(count=True, trace=False)
    target.prepare()
    for data in inputs:
        tracer.runfunc(target.test_one_input, data)
    ran = {(file, line) for file, line in tracer.results().counts}
    print(f"{len(inputs)} inputs")
    for name in target.UNDER_TEST:  # "module" or "module:Class"
        module, _, scope = name.partition(":")
        file = sys.modules[module].__file__
        assert file is not None
        lines = executable_lines(Path(file).read_text(), file, scope)
        missed = sorted(line for line in lines if (file, line) not in ran)
        print(f"{name}: {len(lines) - len(missed)} of {len(lines)} lines run; not run: {missed}")


def executable_lines(source: str, filename: str, scope: str = "") -> set[int]:
    """The lines of the functions in ``source`` (what runs at import is left out),
    or only of those whose qualified name starts with ``scope``."""
    lines: set[int] = set()
    pending: list[CodeType] = [compile(source, filename, "exec")]
    while pending:
        code = pending.pop()
        if code.co_flags & inspect.CO_OPTIMIZED and code.co_qualname.startswith(scope):
            starts = {line for _, line in dis.findlinestarts(code) if line is not None}
            lines.update(starts - {code.co_firstlineno})
        pending.extend(c for c in code.co_consts if isinstance(c, CodeType))
    return lines


if __name__ == "__main__":
    main(sys.argv)
