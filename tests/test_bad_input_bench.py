"""Bad input and bad caches of the benchmarks (`fdgbench bench ...`): a
refusal is one line before any measuring, and a saved block profile or link
that cannot be right is measured again (one warning line), never a
traceback or a silent misprediction. Measuring is faked: these tests check
what the bench does with the figures, not the figures."""
import json
import math
from pathlib import Path

import pytest

from fdgbench.bench import profile as profile_mod
from fdgbench.errors import UserError

TINY_BLOCKS = ["stem", "L1.0", "L2.0", "L3.0", "head"]  # tiny_resnet's
SIMULATE = ["bench", "simulate", "--model", "tiny_resnet", "--batch-size", "4", "--splits", "2,4",
            "--methods", "bp,fdg"]
PROFILE = Path(profile_mod.PROFILE_DIR) / "tiny_resnet-b4-cpu-t1.json"  # SIMULATE's, relative to the working dir
REAL_MEASURE_LINK = profile_mod.measure_link  # before any test fakes it
GOOD_LINK = {"latency_s": 50e-6, "bandwidth_Bps": 5e9, "probe_bytes": 65536, "measured": "faked"}


def _one_error(status, err, message):
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


def _profile(names=TINY_BLOCKS, link=GOOD_LINK):
    blocks = [{"name": name, "forward_s": 1e-3, "backward_s": 2e-3, "update_s": 1e-4, "output_bytes": 65536,
               "parameter_bytes": 4096} for name in names]
    profile = {"model": "tiny_resnet", "batch_size": 4, "device": "cpu", "threads": 1, "iterations": 5,
               "blocks": blocks}
    return {**profile, "link": dict(link)} if link else profile


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """Run in an empty folder (profiles go to its results/profiles) with the
    block profiling and link probe faked; returns the calls made to each."""
    monkeypatch.chdir(tmp_path)
    calls = {"blocks": 0, "link": 0}

    def fake_blocks(model, batch_size, device, threads, iterations=5):
        calls["blocks"] += 1
        return _profile(link=None)

    def fake_link(device, nbytes, repeats=20):
        calls["link"] += 1
        return dict(GOOD_LINK)

    monkeypatch.setattr(profile_mod, "profile_blocks", fake_blocks)
    monkeypatch.setattr(profile_mod, "measure_link", fake_link)
    return calls


@pytest.fixture
def never_measured(tmp_path, monkeypatch):
    """Run in an empty folder where any profiling or link probe fails the test."""
    monkeypatch.chdir(tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("measured before the refusal")

    monkeypatch.setattr(profile_mod, "profile_blocks", fail)
    monkeypatch.setattr(profile_mod, "measure_link", fail)
    monkeypatch.setattr(profile_mod, "_pingpong_times", fail)
    return tmp_path


def _save(content):
    PROFILE.parent.mkdir(parents=True)
    PROFILE.write_text(content if isinstance(content, str) else json.dumps(content))


def _warnings(err):
    return [line for line in err.splitlines() if line.startswith("warning: ")]


# -- 1, 2: a saved profile that cannot be right is measured again, with one warning --------------

def _bad_value(key, value):
    profile = _profile()
    profile["blocks"][2][key] = value
    return profile


@pytest.mark.parametrize("content", [
    '{"model": "tiny_resnet", "batch_size": 4, "blocks": [{"name": "st',  # killed mid-write
    "",
    "[]",
    {"model": "tiny_resnet"},
    _bad_value("forward_s", "fast"),
    _bad_value("backward_s", None),
    _bad_value("forward_s", -1e-3),
    _bad_value("output_bytes", 0),
    _bad_value("update_s", True),
    {k: v for k, v in _profile().items() if k != "threads"},
    {**_profile(), "corun": {"2": "slow"}},
], ids=["truncated", "empty", "list", "no-blocks", "text", "null", "negative", "zero-bytes", "bool",
        "no-threads", "bad-corun"])
def test_an_unusable_saved_profile_is_measured_again_with_one_warning(cli, measured, content):
    _save(content)
    status, out, err = cli(*SIMULATE)
    assert status == 0, err
    assert len(_warnings(err)) == 1 and str(PROFILE) in _warnings(err)[0], err
    assert measured == {"blocks": 1, "link": 1}
    assert json.loads(PROFILE.read_text())["blocks"] == _profile()["blocks"]  # overwritten with the measurement


def test_nan_in_a_saved_profile_is_measured_again(cli, measured):
    _save(json.dumps(_bad_value("forward_s", math.nan)))  # JSON's NaN, which json.loads accepts
    status, _, err = cli(*SIMULATE)
    assert status == 0 and len(_warnings(err)) == 1 and measured["blocks"] == 1, err


def test_a_profile_of_other_blocks_is_stale_and_measured_again(cli, measured):
    # 2 of tiny_resnet's 5 blocks: used as is, it balanced 2 blocks and mispredicted every K.
    _save(_profile(names=TINY_BLOCKS[:2]))
    status, out, err = cli(*SIMULATE)
    assert status == 0, err
    assert len(_warnings(err)) == 1 and "2 block(s) (stem, L1.0) are not tiny_resnet's 5" in err, err
    assert measured["blocks"] == 1
    assert [b["name"] for b in json.loads(PROFILE.read_text())["blocks"]] == TINY_BLOCKS
    assert "not possible" not in out and "  4 fdg" in out  # K=4 is a row: the model's 5 blocks were used


def test_renamed_blocks_are_stale_too(cli, measured):
    _save(_profile(names=["stem", "L1.0", "L1.1", "L3.0", "head"]))
    status, _, err = cli(*SIMULATE)
    assert status == 0 and len(_warnings(err)) == 1 and measured["blocks"] == 1, err


def test_a_sound_saved_profile_is_used_without_measuring_or_warning(cli, measured):
    _save(_profile())
    status, out, err = cli(*SIMULATE)
    assert (status, err, measured) == (0, "", {"blocks": 0, "link": 0})
    assert "50 us + 5.00 GB/s" in out


def test_a_profile_is_written_atomically(measured, monkeypatch):
    # A kill in mid-write (here: the write itself interrupted halfway) leaves the old file whole.
    _save(_profile())
    before = PROFILE.read_text()
    real_write_text = Path.write_text

    def killed_halfway(self, text, *args, **kwargs):
        real_write_text(self, text[:len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Path, "write_text", killed_halfway)
        profile_mod.load_or_profile("tiny_resnet", 4, "cpu", 1, refresh=True)
    assert PROFILE.read_text() == before
    assert [p.name for p in PROFILE.parent.iterdir()] == [PROFILE.name]  # no temporary file left


# -- 3: a grid point `fdgbench run` would refuse is refused, before profiling ----------------------

@pytest.mark.parametrize("command", [["bench", "simulate"], ["bench", "speedup"]])
@pytest.mark.parametrize("methods,message", [
    ("fdg", "fdg splits each batch across 64 replicas: --batch-size 16 must be a multiple of 64"),
    ("dp", "dp splits each batch across 128 replicas: --batch-size 16 must be a multiple of 128"),
])
def test_replicas_that_cannot_share_the_batch_are_refused_before_profiling(cli, never_measured, command, methods,
                                                                          message):
    status, out, err = cli(*command, "--model", "tiny_resnet", "--batch-size", "16", "--splits", "2",
                           "--methods", methods, "--replicas", "64")
    _one_error(status, err, message)
    assert out == "" and not (never_measured / "results").exists()


def test_simulate_keeps_a_no_row_line_for_a_k_past_the_blocks(cli, measured):
    _save(_profile())
    status, out, err = cli("bench", "simulate", "--model", "tiny_resnet", "--batch-size", "4", "--splits", "2,7",
                           "--methods", "fdg")
    assert status == 0, err
    assert "tiny_resnet has 5 blocks, so K=7 is not possible (no row)" in out


# -- 4: the link probe ---------------------------------------------------------------------------

def _timer(monkeypatch, one_way):
    """Fake the ping-pong timer: ``one_way(nbytes)`` is a message's median one-way seconds."""
    sizes_timed = []

    def pingpong_times(device, sizes, repeats):
        sizes_timed.append(sizes[-1])
        return [one_way(n) for n in sizes]

    monkeypatch.setattr(profile_mod, "_pingpong_times", pingpong_times)
    return sizes_timed


def test_a_probe_lost_in_noise_is_refused_not_stored(monkeypatch):
    # Both messages took the same time: the old estimate was nbytes / 1e-9 (524288 GB/s for 512 KiB).
    sizes = _timer(monkeypatch, lambda n: 30e-6)
    with pytest.raises(UserError, match="no plausible bandwidth"):
        profile_mod.measure_link("cpu", 524288)
    assert sizes[0] == 524288 and sizes[-1] == profile_mod.LINK_PROBE_MAX_BYTES  # larger messages were tried


def test_a_probe_too_fast_to_be_real_is_refused(monkeypatch):
    _timer(monkeypatch, lambda n: 1e-6 + n / 5e12)  # 5 TB/s: past any link between two local ranks
    with pytest.raises(UserError, match="no plausible bandwidth"):
        profile_mod.measure_link("cpu", 524288)


def test_a_probe_lost_in_noise_grows_its_message_until_the_transfer_stands_out(monkeypatch):
    # A 64 KiB message's transfer (13 us at 5 GB/s) hides in 30 us of latency
    # (here: timed as nothing); 8x larger (105 us) it stands out.
    sizes = _timer(monkeypatch, lambda n: 30e-6 + (n / 5e9 if n >= 2**19 else 0))
    link = profile_mod.measure_link("cpu", 65536)
    assert sizes == [65536, 524288]
    assert link["bandwidth_Bps"] == pytest.approx(5e9) and link["probe_bytes"] == 524288
    assert link["latency_s"] == pytest.approx(30e-6)


def test_a_failed_link_probe_is_one_error_and_keeps_the_measured_blocks(cli, measured, monkeypatch):
    monkeypatch.setattr(profile_mod, "measure_link", REAL_MEASURE_LINK)  # with the timer faked below
    _timer(monkeypatch, lambda n: 30e-6)
    status, out, err = cli(*SIMULATE)
    assert status == 2 and err.splitlines()[-1].startswith("error: the link probe"), err
    assert "Traceback" not in err and out == ""
    saved = json.loads(PROFILE.read_text())
    assert "link" not in saved and [b["name"] for b in saved["blocks"]] == TINY_BLOCKS


def test_an_implausible_saved_link_is_measured_again_without_the_blocks(cli, measured):
    _save(_profile(link={**GOOD_LINK, "bandwidth_Bps": 524288e9}))
    status, out, err = cli(*SIMULATE)
    assert status == 0, err
    assert len(_warnings(err)) == 1 and "524288.00 GB/s is implausible" in err and str(PROFILE) in err, err
    assert measured == {"blocks": 0, "link": 1}
    assert json.loads(PROFILE.read_text())["link"]["bandwidth_Bps"] == 5e9
    assert "5.00 GB/s" in out


@pytest.mark.parametrize("link", [{**GOOD_LINK, "bandwidth_Bps": 0}, {**GOOD_LINK, "latency_s": -1.0},
                                  {"latency_s": 50e-6}, "fast"])
def test_a_non_positive_or_missing_saved_link_is_measured_again(cli, measured, link):
    _save({**_profile(), "link": link})
    status, _, err = cli(*SIMULATE)
    assert status == 0 and len(_warnings(err)) == 1 and measured == {"blocks": 0, "link": 1}, err


# -- 5: K and the like are checked before any profiling or printing --------------------------------

def test_speedup_refuses_a_k_past_the_blocks_before_profiling(cli, never_measured):
    status, out, err = cli("bench", "speedup", "--model", "tiny_resnet", "--splits", "7", "--methods", "fdg",
                           "--batch-size", "4", "--iterations", "1")
    _one_error(status, err, "tiny_resnet has 5 blocks, so it cannot be split into 7 stages")
    assert out == "" and not (never_measured / "results").exists()


def test_speedup_with_a_saved_profile_refuses_before_reading_it(cli, never_measured):
    _save("[]")  # would warn, then re-measure
    status, out, err = cli("bench", "speedup", "--model", "tiny_resnet", "--splits", "7", "--methods", "fdg",
                           "--batch-size", "4", "--reuse-profile")
    _one_error(status, err, "cannot be split into 7 stages")
    assert PROFILE.read_text() == "[]"


def test_memory_refuses_a_k_past_the_blocks_before_printing(cli):
    status, out, err = cli("bench", "memory", "--model", "tiny_resnet", "-K", "9", "--batch-size", "4")
    _one_error(status, err, "tiny_resnet has 5 blocks, so it cannot be split into 9 stages")
    assert out == ""
