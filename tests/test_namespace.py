"""The library installs under ``saelake``: a researcher's own ``train.py`` / ``analyze.py`` (the most
common script names in this field) never shadows it, and no top-level ``lake``/``train``/``analyze``/
``catalog`` module is installed to collide with other projects."""

import subprocess
import sys
import textwrap


def _python(cwd, *args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_no_top_level_modules_are_installed(tmp_path):
    code = (
        "import importlib.util\n"
        "print([m for m in ('lake', 'train', 'analyze', 'catalog') if importlib.util.find_spec(m)])"
    )
    p = _python(tmp_path, "-c", code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_a_script_named_train_py_next_to_analyze_py_uses_the_library(tmp_path, tiny_lake):
    # the researcher's own helper module, named like the library's package
    (tmp_path / "analyze.py").write_text("def summary(batch):\n    return f'{len(batch.token_id)} rows'\n")
    (tmp_path / "train.py").write_text(
        textwrap.dedent(f"""
        import importlib

        helper = importlib.import_module("analyze")  # the researcher's ./analyze.py, not the library
        from saelake.analyze import AnalyzeConfig
        from saelake.lake import SnapshotSource
        from saelake.train import SAEConfig, SAEStore

        src = SnapshotSource({tiny_lake!r}, "r1")
        batch = next(src.token_batches(64, seed=0))
        print(helper.summary(batch), SAEStore.__module__, SAEConfig.__module__, AnalyzeConfig.__module__)
    """)
    )
    p = _python(tmp_path, "train.py")
    assert p.returncode == 0, p.stderr[-2000:]
    words = p.stdout.split()
    assert words[:2] == ["64", "rows"]
    assert all(m.startswith("saelake.") for m in words[2:]), words
