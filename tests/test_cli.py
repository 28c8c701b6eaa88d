"""The command line: every setting is a flag generated from its config dataclass (help from
its docstring, one name from the flag to the module), the ksae command and the reproductions
run as processes from any folder, and every mistake of the user ends in one line, exit code 2,
before anything is written."""
import ast
import dataclasses
import typing
import subprocess
import sys
from pathlib import Path

import pytest

from ksae_jax import cli, flags, image_run, sae_run
from ksae_jax.data import images as data

ROOT = Path(__file__).resolve().parents[1]


def _all_flags(parser) -> dict[str, str]:
    return {s: a.help or "" for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("groups", [sae_run.groups(), image_run.GROUPS], ids=["train", "ksweep"])
def test_every_setting_of_a_command_is_a_flag_with_its_docstring(groups):
    parser = flags.make_parser("x", "", groups)
    shown = _all_flags(parser)
    for group in groups:
        for cls in group.classes:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if f.name in group.skip or dataclasses.is_dataclass(hints[f.name]):
                    continue  # nested configs: their own fields are flags
                names = [flags.flag(f.name), flags.flag(f"no_{f.name}")]
                name = next((n for n in names if n in shown), None)
                assert name, f"{cls.__name__}.{f.name} has no flag"
                docs = [flags.docs(c)[f.name] for c in group.classes if f.name in flags.docs(c)]
                assert any(d and shown[name].startswith(d[:40]) for d in docs), (f.name, shown[name])


def test_a_flag_reaches_its_field_under_its_own_name():
    parser = flags.make_parser("x", "", sae_run.groups(), {"arch": "topk"})
    values = {"arch": "topk", **flags.parse(parser, [
        "--data", "x.npy", "--latents", "96", "--ks", "3", "--lr", "2e-3", "--adam-eps", "1e-7",
        "--batching", "vmap", "--aux-coef", "0.5", "--multi-topk", "--no-progress"])}
    cfg = sae_run.sweep_config(values, 12)
    assert (cfg.model.latents, cfg.model.aux_coef, cfg.model.multi_topk) == (96, 0.5, True)
    assert (cfg.ks, cfg.optim.lr, cfg.optim.adam_eps, cfg.execution.batching) == \
        ((3,), 2e-3, 1e-7, "vmap")
    assert values["progress"] is False and values["data"] == Path("x.npy")


def test_the_ksae_command_runs_from_any_folder(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    top = subprocess.run([sys.executable, "-m", "ksae_jax", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert top.returncode == 0 and all(name in top.stdout for name in cli.COMMANDS)
    train = subprocess.run([sys.executable, "-m", "ksae_jax", "train", "--help"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert train.returncode == 0 and "--latents" in train.stdout and "--b-enc-mean-keep" in train.stdout
    bad = subprocess.run([sys.executable, "-m", "ksae_jax", "trian"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr


def imported_packages(path):
    """The top-level packages a Python file imports."""
    tree = ast.parse(path.read_text())
    names = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return names | {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names}


def test_reproductions_are_flags_plus_one_call_and_import_nothing_of_each_other():
    for path in sorted((ROOT / "experiments").glob("*.py")):
        assert len(path.read_text().splitlines()) <= 100, path.name
        assert "experiments" not in imported_packages(path), path.name
    for folder in ("ksae_jax", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            assert "experiments" not in imported_packages(path), path


# ---------------------------------------------------------------- one line, exit code 2

def ksweep(argv):
    cli.run(lambda: image_run.main(argv), "ksweep")


@pytest.mark.parametrize("given,message", [
    (["--ks", "0"], "k must be positive, got k=0"),
    (["--ks", "300"], "k=300 is larger than the code's 256 units"),
    (["--ks"], "ks is empty"),
    (["--ks", "2.5"], "expected int, got '2.5'"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--batch-size", "5000"], "larger than the training set (4000 rows)"),
    (["--steps", "5", "--epochs", "2"], "give steps or epochs, not both"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--l1", "-0.1"], "--l1 must be >= 0, got -0.1"),
    (["--dataset", "no_such_set"], "invalid choice: 'no_such_set'"),
    (["--idx-dir", "/no/such/dir"], "no such directory"),
    (["--arch", "rnn"], "invalid choice: 'rnn'"),
    (["--tied"], "tied weights exist only for arch 'mlp'"),
    (["--ks", "5", "--aux-coef", "1", "--aux-k", "999"], "--aux-k=999 is larger than the code's 256 units"),
    (["--on-nan", "ignore"], "invalid choice: 'ignore'"),
])
def test_bad_flags_exit_2_with_one_line(given, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_tfds", lambda *a, **k: (_ for _ in ()).throw(
        data.DatasetUnavailable("offline")))
    argv = ["--dataset", "mnist-sample", "--out", str(tmp_path / "o"), "--no-progress"] + given
    with pytest.raises(SystemExit) as e:
        ksweep(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_out_dir_is_not_overwritten_without_flag(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit) as e:
        ksweep(["--dataset", "mnist-sample", "--out", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for given, message in [(["--out", str(blocker / "sub")], "not writable"),
                           (["--out", str(blocker)], "exists and is not a directory")]:
        with pytest.raises(SystemExit) as e:
            ksweep(["--dataset", "mnist-sample", "--no-progress"] + given)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_data_errors_leave_no_output_folder(tmp_path, capsys):
    bad_idx = tmp_path / "idx"
    bad_idx.mkdir()
    (bad_idx / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03")
    for given in (["--idx-dir", str(bad_idx)], ["--idx-dir", str(tmp_path / "none")]):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as e:
            ksweep(given + ["--out", str(out), "--no-progress"])
        assert e.value.code == 2 and not out.exists()
        capsys.readouterr()


def test_the_real_command_line_refuses_before_tensorflow_and_without_a_traceback():
    """The refusal happens before TensorFlow (TFDS) is imported: nothing slow, no TF noise."""
    probe = ("import sys\nfrom ksae_jax import cli, image_run\n"
             "try:\n    cli.run(lambda: image_run.main(sys.argv[1:]), 'ksweep')\n"
             "except SystemExit as e:\n"
             "    tf = any(m.split('.')[0] in ('tensorflow', 'tensorflow_datasets') for m in sys.modules)\n"
             "    print('exit', e.code, 'tensorflow' if tf else 'no tensorflow')\n")
    r = subprocess.run([sys.executable, "-c", probe, "--dataset", "nonsense"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.stdout.strip() == "exit 2 no tensorflow", (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "invalid choice: 'nonsense'" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "experiments.ksweep", "--ks", "-4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "ksweep: error: k must be positive, got k=-4"
