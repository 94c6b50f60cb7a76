"""Helpers shared by the tests: run a script's main in-process as a user would; Markdown tables read back."""
import importlib
import sys


def run_script(capsys, module_name: str, argv):
    """Run ``module.main`` through ``run_main``; return (exit code, stdout, stderr)."""
    from utils.training import run_main

    module = importlib.import_module(module_name)
    old = sys.argv
    sys.argv = [f"{module_name}.py", *map(str, argv)]
    code = 0
    try:
        run_main(lambda: module.main([str(a) for a in argv]))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(result, *fragments):
    code, _, err = result
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def spy_on_pgd(monkeypatch, module):
    """Record the named arguments of every attack that ``module`` (a training script) crafts."""
    import inspect

    real = module.pgd
    calls = []

    def spy(*a, **k):
        bound = inspect.signature(real).bind(*a, **k)
        bound.apply_defaults()
        calls.append({name: v for name, v in bound.arguments.items() if name not in ("model", "x", "y")})
        return real(*a, **k)

    monkeypatch.setattr(module, "pgd", spy)
    return calls


def markdown_tables(text):
    """Markdown tables of ``text`` as lists of {column: cell}."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            tables.append([dict(zip(block[0], row)) for row in block[2:]])
            block = []
    return tables
