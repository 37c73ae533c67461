"""Per-GPU tile tables (kernels/tuning.py): loading, lookup, overrides, the compile fallback.

How the tuned tiles compute is tested per family (tests/attention/test_tuned_tiles.py runs the
kernels with the sm90 table's tiles under the interpreter); this file tests the mechanism.
"""

import json
import warnings

import pytest
import torch
from triton.runtime.errors import OutOfResources

from docqa_fast.kernels import registry, tuning
from docqa_fast.testing import tuned_tables

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_tables(monkeypatch):
    with tuned_tables(monkeypatch, None):
        registry.registered_configs()  # every kernel module imported: every tunable kernel declared
        yield


def _tiles(m, n, warps, stages):
    return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": warps, "num_stages": stages}


def _write_table(directory, arch, version, kernels, **fields):
    data = {"format": tuning.FORMAT, "arch": arch, "triton": f"{version[0]}.{version[1]}",
            "kernels": {kernel: {key: {"tiles": tiles} for key, tiles in entries.items()}
                        for kernel, entries in kernels.items()}, **fields}
    path = directory / tuning.table_name(arch, version)
    path.write_text(json.dumps(data))
    return path


def test_shipped_tables_are_valid_and_named_for_their_contents():
    tables = tuning.table_files()
    assert "sm90" in tables, "the H200 tiles are shipped as the first sm90 table"
    for arch, versions in tables.items():
        for version, path in versions:
            data = json.loads(path.read_text())
            assert data["format"] == tuning.FORMAT and data["arch"] == arch
            assert data["triton"] == f"{version[0]}.{version[1]}"
            assert data.get("device") and data.get("date") and data.get("source"), path.name
            for kernel, entries in data["kernels"].items():
                for key, entry in entries.items():
                    tuning.check_tiles(kernel, entry["tiles"])  # raises on an invalid entry
                    assert entry.get("shape"), f"{kernel}[{key}] does not say what shape it was measured at"
                    assert entry.get("candidates"), f"{kernel}[{key}] keeps no candidate timings"


def test_sm90_table_holds_the_h200_sweep():
    """The tiles the first H200 sweep measured fastest (issue "Tuned on the GPU")."""
    table = tuning.load_table(str(tuning.nearest_table("sm90", (3, 6))))
    assert table["attention_backward_dkdv"]["D=128,tma"] == _tiles(64, 64, 4, 2)
    assert table["attention_backward_dq"]["D=128,tma"] == _tiles(128, 64, 8, 4)
    assert table["attention_forward"]["D=128,tma"] == _tiles(128, 128, 8, 3)
    assert table["attention_backward_dkdv"]["D=80"] == _tiles(64, 64, 4, 2)
    assert table["attention_backward_dq"]["D=80"] == _tiles(128, 64, 8, 3)
    assert table["attention_forward"]["D=80"] == _tiles(128, 128, 8, 3)


def test_nearest_triton_version_of_the_same_architecture(tmp_path):
    for version in ((3, 4), (3, 6), (3, 9)):
        _write_table(tmp_path, "sm90", version, {})
    _write_table(tmp_path, "sm80", (3, 8), {})
    assert tuning.nearest_table("sm90", (3, 8), tmp_path).name == "sm90-triton3.9.json"
    assert tuning.nearest_table("sm90", (3, 5), tmp_path).name == "sm90-triton3.6.json"  # equally near: newer
    assert tuning.nearest_table("sm90", (3, 3), tmp_path).name == "sm90-triton3.4.json"
    assert tuning.nearest_table("sm100", (3, 8), tmp_path) is None
    for version in ((2, 6), (4, 6)):
        _write_table(tmp_path, "sm89", version, {})
    assert tuning.nearest_table("sm89", (3, 6), tmp_path).name == "sm89-triton4.6.json"  # equally near: newer


def test_cpu_tensors_use_defaults_unless_a_table_is_forced(monkeypatch):
    default = _tiles(64, 64, 4, 3)
    assert tuning.lookup("attention_forward", "D=128,tma", default, CPU) == default
    monkeypatch.setenv(tuning.TABLE_ENV, "sm90")
    assert tuning.lookup("attention_forward", "D=128,tma", default, CPU) == _tiles(128, 128, 8, 3)
    assert tuning.lookup("attention_forward", "D=96", default, CPU) == default  # not in the table
    monkeypatch.setenv(tuning.TABLE_ENV, "SM90")
    assert tuning.lookup("attention_forward", "D=128,tma", default, CPU) == _tiles(128, 128, 8, 3)
    monkeypatch.setenv(tuning.TABLE_ENV, "OFF")
    assert tuning.lookup("attention_forward", "D=128,tma", default, CPU) == default
    monkeypatch.setenv(tuning.TABLE_ENV, "fastest please")
    with pytest.raises(ValueError, match=tuning.TABLE_ENV):
        tuning.lookup("attention_forward", "D=128,tma", default, CPU)


def test_invalid_entries_are_dropped_with_a_warning(tmp_path, monkeypatch):
    path = _write_table(tmp_path, "sm90", (3, 6), {"attention_forward": {
        "D=64": _tiles(128, 96, 8, 3),  # BLOCK_N not a power of two
        "D=128": _tiles(128, 64, 8, 3),
    }, "attention_backward_dq": {"D=64": {"BLOCK_M": 64, "num_warps": 4}}})  # parameters missing
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    with pytest.warns(UserWarning, match="ignored") as caught:
        default = _tiles(32, 32, 4, 1)
        assert tuning.lookup("attention_forward", "D=64", default, CPU) == default
    assert len(caught) == 2
    assert tuning.lookup("attention_forward", "D=128", default, CPU) == _tiles(128, 64, 8, 3)


def test_check_tiles_names_what_is_wrong():
    with pytest.raises(ValueError, match="num_warps"):
        tuning.check_tiles("attention_forward", _tiles(64, 64, 3, 2))
    with pytest.raises(ValueError, match="num_stages"):
        tuning.check_tiles("attention_forward", _tiles(64, 64, 4, 0))
    with pytest.raises(ValueError, match="unknown tunable kernel"):
        tuning.check_tiles("no_such_kernel", _tiles(64, 64, 4, 2))


def test_override_wins_and_is_undone():
    default = _tiles(64, 64, 4, 3)
    with tuning.override("attention_forward", "D=64", _tiles(32, 32, 4, 1)):
        assert tuning.lookup("attention_forward", "D=64", default, CPU) == _tiles(32, 32, 4, 1)
        assert tuning.lookup("attention_forward", "D=80", default, CPU) == default
    assert tuning.lookup("attention_forward", "D=64", default, CPU) == default


def test_tuned_tiles_that_do_not_compile_fall_back_to_the_defaults(monkeypatch):
    monkeypatch.setenv(tuning.TABLE_ENV, "sm90")
    default = _tiles(64, 64, 4, 3)
    launched = []

    def run(tiles):
        launched.append(tiles)
        if tiles["BLOCK_N"] == 128:
            raise OutOfResources(240000, 232448, "shared memory")
        return "ran"

    with pytest.warns(RuntimeWarning, match="do not compile"):
        assert tuning.launch("attention_forward", "D=128,tma", default, CPU, run) == "ran"
    assert launched == [_tiles(128, 128, 8, 3), default]
    launched.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: the defaults at once, no new warning
        assert tuning.launch("attention_forward", "D=128,tma", default, CPU, run) == "ran"
    assert launched == [default]


def test_other_errors_and_overrides_do_not_fall_back(monkeypatch):
    monkeypatch.setenv(tuning.TABLE_ENV, "sm90")
    default = _tiles(64, 64, 4, 3)

    def bad_input(tiles):
        raise ValueError("expected q of dtype torch.float16")

    with pytest.raises(ValueError, match="expected q"):
        tuning.launch("attention_forward", "D=128,tma", default, CPU, bad_input)

    def no_resources(tiles):
        raise OutOfResources(240000, 232448, "shared memory")

    with tuning.override("attention_forward", "D=128,tma", _tiles(128, 128, 8, 4)):
        with pytest.raises(OutOfResources):  # the tuning tool must see a candidate fail
            tuning.launch("attention_forward", "D=128,tma", default, CPU, no_resources)


def test_registry_covers_the_tuned_tiles():
    """The Hopper compile check covers what launchers pick on Hopper: the sm90 table's tiles too."""
    names = {config.name for config in registry.registered_configs()}
    assert "attention_forward[bf16,D=128,plain,tma,M128N128w8s3]" in names
    assert "attention_backward_dq[bf16,D=128,plain,tma,M128N64w8s4]" in names
    assert "attention_backward_dkdv[bf16,D=80,all_options,M64N64w4s2]" in names
    assert "attention_forward[bf16,D=128,plain,tma,M64N64w4s3]" in names  # the built-in tiles stay covered


@pytest.mark.parametrize("first", ["inference", "losses", "attention", "merge_attention"])
def test_every_committed_entry_survives_any_import_order(first):
    """Whichever kernel module a process imports first, every entry of every committed table is
    read: a table loaded while kernel modules were still importing once dropped the entries of
    kernels not declared yet (decode_attention's measured tiles were ignored on the H200)."""
    import subprocess
    import sys

    script = (
        "import json, warnings\n"
        "warnings.simplefilter('error')\n"
        f"import docqa_fast.kernels.{first}\n"
        "from docqa_fast.kernels import registry, tuning\n"
        "registry.registered_configs()\n"
        "for paths in tuning.table_files().values():\n"
        "    for _, path in paths:\n"
        "        raw = json.loads(path.read_text())['kernels']\n"
        "        loaded = tuning.load_table(str(path))\n"
        "        assert {k: set(v) for k, v in loaded.items()} == {k: set(v) for k, v in raw.items()}, path\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
