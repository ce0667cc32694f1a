"""Dataset loading, row formats, sampling, batching, packing.

Oracles: the seed's documented semantics (``--dataset id_or_path:subset#N``, --columns, --strict),
hand-computed expectations for small inputs, and, for batching, the tiny mcore model itself: the
per-token losses of one mixed-length batch laid out padded, padding-free (THD) and packed must be
equal (fp32) and so must their sums.
"""

from __future__ import annotations

import csv
import json
import logging
import os

import numpy as np
import pytest
import torch

from megatron_swift.args.commands import SftArguments
from megatron_swift.data import (Collator, DataOptions, DataRowError, DatasetNotFoundError, MicroBatchSampler,
                                 RowError, load_datasets, make_tiny_tokenizer, normalize_row, pack_lengths,
                                 parse_dataset_spec, prepare_data, preview_samples, sample_indices, shift_labels)
from megatron_swift.data.packing import cached_packs
from megatron_swift.template import get_template

IGNORE = -100


@pytest.fixture(scope="module", autouse=True)
def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    yield


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tok") / "qwen2_5"), "qwen2_5")


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def chat(q, a, system=None):
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + msgs}


def opts(tmp_path, **kw):
    kw.setdefault("dataset_shuffle", False)
    return DataOptions(**kw)


def contents(ds):
    return [m[-1]["content"] for m in ds["messages"]]


# ------------------------------------------------------------------------------------ specs / sampling
def test_dataset_spec_syntax(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [chat("q", "a")])
    spec = parse_dataset_spec(f"{f}#7")
    assert spec.local_path == f and spec.sample == 7 and spec.subsets == []
    (tmp_path / "folder" / "sub1").mkdir(parents=True)
    spec = parse_dataset_spec(f"{tmp_path / 'folder'}:sub1/sub2#3")
    assert spec.is_local and spec.subsets == ["sub1", "sub2"] and spec.sample == 3
    spec = parse_dataset_spec("AI-ModelScope/alpaca-gpt4-data-en:default#500")
    assert not spec.is_local and spec.name == "AI-ModelScope/alpaca-gpt4-data-en" and spec.sample == 500
    with pytest.raises(DatasetNotFoundError, match="no such file"):
        parse_dataset_spec(str(tmp_path / "missing.jsonl"))


def test_sample_indices_semantics():
    rng = np.random.RandomState(0)
    below = sample_indices(10, 4, True, rng)
    assert len(below) == 4 and len(set(below.tolist())) == 4  # without replacement
    above = sample_indices(10, 23, True, rng)
    counts = np.bincount(above, minlength=10)
    assert len(above) == 23 and counts.min() == 2 and (counts == 3).sum() == 3  # 2 repeats + 3 distinct extra
    assert sample_indices(10, 4, False, rng).tolist() == [0, 1, 2, 3]  # sequential without shuffle
    assert sample_indices(3, 7, False, rng).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_hash_n_sampling_through_loader(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(5)])
    seq = load_datasets(opts(tmp_path, dataset=[f"{f}#7"]), cache_dir=str(tmp_path / "c")).train
    assert contents(seq) == ["a0", "a1", "a2", "a3", "a4", "a0", "a1"]
    rnd = load_datasets(opts(tmp_path, dataset=[f"{f}#3"], dataset_shuffle=True, data_seed=1),
                        cache_dir=str(tmp_path / "c")).train
    assert len(rnd) == 3 and len(set(contents(rnd))) == 3
    again = load_datasets(opts(tmp_path, dataset=[f"{f}#3"], dataset_shuffle=True, data_seed=1),
                          cache_dir=str(tmp_path / "c")).train
    assert contents(again) == contents(rnd)  # --data_seed makes it reproducible
    stream = load_datasets(opts(tmp_path, dataset=[f"{f}#2"], streaming=True), cache_dir=str(tmp_path / "c")).train
    assert [r["messages"][-1]["content"] for r in stream] == ["a0", "a1"]  # streaming: sequential


# ------------------------------------------------------------------------------------ row formats
def test_row_formats_normalize():
    msgs = normalize_row({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                                            {"from": "gpt", "value": "a"}]})["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    alpaca = normalize_row({"instruction": "do", "input": "x", "output": "y", "system": "S"})["messages"]
    assert alpaca == [{"role": "system", "content": "S"}, {"role": "user", "content": "do\nx"},
                      {"role": "assistant", "content": "y"}]
    hist = normalize_row({"query": "q2", "response": "r2", "history": [["q1", "r1"]]})["messages"]
    assert [m["content"] for m in hist] == ["q1", "r1", "q2", "r2"]
    assert normalize_row({"text": "plain"})["messages"] == [{"role": "assistant", "content": "plain"}]
    dpo = normalize_row({**chat("q", "good"), "rejected_response": "bad"})
    assert dpo["rejected_response"] == "bad"
    hh = normalize_row({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
                        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]})
    assert hh["messages"][-1]["content"] == "good" and hh["rejected_response"] == "bad"
    assert normalize_row({"prompt": "q", "chosen": "good", "rejected": "bad"})["rejected_response"] == "bad"
    assert normalize_row({**chat("q", "a"), "label": "false"})["label"] is False
    tools = normalize_row({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"x\"}"}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
        "tools": [{"name": "get_weather"}]})
    assert [m["role"] for m in tools["messages"]] == ["user", "tool_call", "tool_response", "assistant"]
    assert json.loads(tools["tools"]) == [{"name": "get_weather"}]


@pytest.mark.parametrize("row, kind", [
    ("{not json", "bad JSON"),
    ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}, "missing role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "empty assistant turn"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "wrong type"),
    ({"messages": "hello"}, "wrong type"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "roles out of order"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no response"),
    ({"foo": 1}, "unknown format"),
    ({"question": "q", "reply": "a"}, "no response"),  # 'question' is 'query'; no 'response' column
])
def test_malformed_rows_are_rejected(row, kind):
    with pytest.raises(RowError) as e:
        normalize_row(json.dumps(row) if isinstance(row, dict) else row)
    assert e.value.kind == kind


def bad_file(tmp_path):
    return write_jsonl(tmp_path / "mixed.jsonl", [
        chat("q1", "a1"),
        {"messages": [{"content": "no role"}]},
        chat("q3", "a3"),
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": ["a", 1]}, {"role": "assistant", "content": "y"}]},
    ], raw_lines=["{broken json"])


def test_bad_rows_dropped_and_counted(tmp_path, caplog):
    f = bad_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger="megatron_swift.data"):
        loaded = load_datasets(opts(tmp_path, dataset=[f]), cache_dir=str(tmp_path / "c"))
    assert contents(loaded.train) == ["a1", "a3"]
    st = loaded.stats[0]
    assert (st.total, st.kept, st.dropped) == (6, 2, 4)
    assert st.kinds == {"missing role": 1, "empty assistant turn": 1, "wrong type": 1, "bad JSON": 1}
    assert "dropped 4 of 6 rows" in caplog.text and "mixed.jsonl:2" in caplog.text


def test_strict_stops_at_first_bad_row(tmp_path):
    f = bad_file(tmp_path)
    with pytest.raises(DataRowError, match=r"mixed\.jsonl:2: missing role"):
        load_datasets(opts(tmp_path, dataset=[f], strict=True), cache_dir=str(tmp_path / "c"))


def test_undecodable_and_malformed_lines_are_bad_rows(tmp_path, caplog):
    """A byte that is not UTF-8 used to stop the whole run without a file or line; now it is one
    dropped row (file:line and reason in the drop summary), and the rows after it still train."""
    path = tmp_path / "latin.jsonl"
    with open(path, "wb") as f:
        f.write((json.dumps(chat("q1", "a1")) + "\n").encode())
        f.write(b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}\n')
        f.write((json.dumps(chat("q3", "a3")) + "\n").encode())
        f.write(b"{broken json\n")
        f.write((json.dumps(chat("q5", "a5")) + "\n").encode())
    with caplog.at_level(logging.WARNING, logger="megatron_swift.data"):
        loaded = load_datasets(opts(tmp_path, dataset=[str(path)]), cache_dir=str(tmp_path / "c"))
    assert contents(loaded.train) == ["a1", "a3", "a5"]  # the good rows after the bad line are kept
    st = loaded.stats[0]
    assert (st.total, st.kept) == (5, 3) and st.kinds == {"not UTF-8": 1, "bad JSON": 1}
    assert "dropped 2 of 5 rows" in caplog.text
    assert "latin.jsonl:2: not UTF-8: byte 0xe9" in caplog.text and "latin.jsonl:4: bad JSON" in caplog.text
    with pytest.raises(DataRowError, match=r"latin\.jsonl:2: not UTF-8: byte 0xe9 at position \d+"):
        load_datasets(opts(tmp_path, dataset=[str(path)], strict=True), cache_dir=str(tmp_path / "c"))
    with open(tmp_path / "latin.csv", "wb") as f:  # the same for a CSV row
        f.write(b"query,response\nq1,a1\ncaf\xe9,x\nq3,a3\n")
    csv_loaded = load_datasets(opts(tmp_path, dataset=[str(tmp_path / "latin.csv")]), cache_dir=str(tmp_path / "c"))
    assert contents(csv_loaded.train) == ["a1", "a3"] and csv_loaded.stats[0].kinds == {"not UTF-8": 1}
    assert "latin.csv:3: not UTF-8" in csv_loaded.stats[0].examples[0]


def test_empty_file_is_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"--dataset '.*empty\.jsonl': dataset file .*empty\.jsonl is empty"):
        load_datasets(opts(tmp_path, dataset=[str(empty)]), cache_dir=str(tmp_path / "c"))


def test_no_rows_left_is_one_clear_error(tmp_path, tokenizer):
    """Every row dropped (no assistant turn, wrong columns) or #0: one ValueError naming the dataset
    with its drop summary, not a KeyError from the empty table at the encode step."""
    no_answer = write_jsonl(tmp_path / "no_answer.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}]}
                                                          for i in range(4)])
    with pytest.raises(ValueError) as e:
        prepare_data(args_for([no_answer]), tokenizer, cache_dir=str(tmp_path / "c"))
    assert str(e.value).startswith(f"no training samples left: {no_answer}: preprocess: dropped 4 of 4 rows "
                                   "(4 x no response); first: no_answer.jsonl:1: no response")
    columns = write_jsonl(tmp_path / "columns.jsonl", [{"prompt_text": "q", "reply": "a"}] * 3)
    with pytest.raises(ValueError, match=r"no training samples left: .*columns\.jsonl: preprocess: dropped 3 of 3 "
                                         r"rows \(3 x unknown format\); first: columns\.jsonl:1: .*--columns"):
        prepare_data(args_for([columns]), tokenizer, cache_dir=str(tmp_path / "c"))
    good = write_jsonl(tmp_path / "good.jsonl", [chat("q", "a")] * 3)
    with pytest.raises(ValueError, match=r"no training samples left: --dataset '.*good\.jsonl#0': #0 selects no rows"):
        prepare_data(args_for([f"{good}#0"]), tokenizer, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"no validation samples left: .*no_answer\.jsonl: preprocess: dropped 4"):
        prepare_data(args_for([good], val_dataset=[no_answer]), tokenizer, cache_dir=str(tmp_path / "c"))


def test_media_rows_stop_preprocessing(tmp_path):
    """Multimodal is not built: a row with images/audios/videos is an error at its file:line, not a
    text row with a literal <image>."""
    f = write_jsonl(tmp_path / "vl.jsonl", [{**chat("describe", "a cat"), "images": []},
                                            {**chat("<image>describe", "a cat"), "images": ["cat.png"]},
                                            {**chat("<image>describe", "a dog"), "images": ["dog.png"]}])
    with pytest.raises(DataRowError, match=r"vl\.jsonl:2: column 'images' is not empty: multimodal training is not "
                                           r"supported"):
        load_datasets(opts(tmp_path, dataset=[f]), cache_dir=str(tmp_path / "c"))
    g = write_jsonl(tmp_path / "audio.jsonl", [{"query": "q", "response": "a", "speech": "a.wav"}])
    with pytest.raises(DataRowError, match=r"audio\.jsonl:1: column 'audios'"):  # after --columns renames
        load_datasets(opts(tmp_path, dataset=[g], columns={"speech": "audios"}), cache_dir=str(tmp_path / "c"))


def _parsed_sft_args(tmp_path, data_file):
    from megatron_swift.args import parse_args

    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 4, "torch_dtype": "bfloat16"}))
    return parse_args("sft", ["--model", str(model), "--dataset", data_file, "--train_iters", "2"], world_size=1)


def test_check_dataset_args_before_any_worker(tmp_path):
    """Dataset arguments that can only fail are ArgumentErrors naming the argument and the value,
    raised while arguments are validated (stdlib only: no torch, no datasets)."""
    import subprocess
    import sys

    from megatron_swift.args import ArgumentError
    from megatron_swift.data.checks import check_dataset_args

    good = write_jsonl(tmp_path / "good.jsonl", [chat("q", "a")])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "part.jsonl", [chat("q", "a")])
    args = _parsed_sft_args(tmp_path, good)
    for ok in ([good], [f"{good}#5"], [str(tmp_path / "folder")], ["AI-ModelScope/alpaca-gpt4-data-en#500"]):
        args.dataset = ok
        check_dataset_args(args)
    cases = [
        ("dataset", str(tmp_path / "missing.jsonl"), "no such file or folder"),
        ("dataset", "./no/such/folder", "no such file or folder"),
        ("dataset", f"{good}#-5", "must be the number of rows to sample (a non-negative integer), got '-5'"),
        ("dataset", f"{good}#abc", "got 'abc'"),
        ("dataset", f"{good}#0", "#0 selects no rows"),
        ("dataset", str(tmp_path / "empty.jsonl"), f"dataset file {tmp_path / 'empty.jsonl'} is empty"),
        ("dataset", str(tmp_path / "notes.txt"), "unsupported file type .txt"),
        ("val_dataset", str(tmp_path / "missing_val.jsonl"), "no such file or folder"),
    ]
    for name, value, why in cases:
        args.dataset, args.val_dataset = [good], []
        setattr(args, name, [value])
        with pytest.raises(ArgumentError) as e:
            check_dataset_args(args)
        assert str(e.value).startswith(f"argument --{name} {value!r}: ") and why in str(e.value), str(e.value)
    code = ("import sys\nfrom megatron_swift.args.commands import SftArguments\n"
            "from megatron_swift.data.checks import check_dataset_args\n"
            "check_dataset_args(SftArguments(dataset=[sys.argv[1]], val_dataset=[]))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'datasets', 'numpy')))\n")
    out = subprocess.run([sys.executable, "-c", code, good], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_columns_mapping_csv_json_and_folders(tmp_path):
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text1", "text2"])
        w.writerow(["q1", "a1"])
        w.writerow(["q2", "a2", "extra"])  # wrong field count: dropped
    loaded = load_datasets(opts(tmp_path, dataset=[str(tmp_path / "d.csv")],
                                columns={"text1": "query", "text2": "response"}), cache_dir=str(tmp_path / "c"))
    assert contents(loaded.train) == ["a1"] and loaded.stats[0].kinds == {"malformed row": 1}

    folder = tmp_path / "folder"
    (folder / "en").mkdir(parents=True)
    (folder / "zh").mkdir()
    with open(folder / "en" / "part.json", "w") as fh:
        json.dump([chat("q", "english"), {"instruction": "i", "output": "english2"}], fh)
    write_jsonl(folder / "zh" / "part.jsonl", [chat("q", "中文")])
    en = load_datasets(opts(tmp_path, dataset=[f"{folder}:en"]), cache_dir=str(tmp_path / "c")).train
    assert contents(en) == ["english", "english2"]
    every = load_datasets(opts(tmp_path, dataset=[str(folder)]), cache_dir=str(tmp_path / "c")).train
    assert sorted(contents(every)) == ["english", "english2", "中文"]


@pytest.mark.parametrize("use_hf, env", [(True, "HF_HUB_OFFLINE"), (False, "MODELSCOPE_OFFLINE")])
def test_hub_dataset_offline_not_cached(tmp_path, monkeypatch, use_hf, env):
    monkeypatch.setenv(env, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    with pytest.raises(DatasetNotFoundError) as e:
        load_datasets(opts(tmp_path, dataset=["no-such-org/no-such-dataset#10"], use_hf=use_hf),
                      cache_dir=str(tmp_path / "c"))
    msg = str(e.value)
    assert "no-such-org/no-such-dataset" in msg and "offline" in msg and "local path" in msg


def test_hub_dataset_from_offline_hf_cache(tmp_path, monkeypatch):
    """A hub id found in the Hugging Face cache loads offline (its train files), with #N."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    snap = cache / "datasets--some-org--chat" / "snapshots" / ("a" * 40)
    (snap / "data").mkdir(parents=True)
    write_jsonl(snap / "data" / "train.jsonl", [chat(f"q{i}", f"a{i}") for i in range(4)])
    write_jsonl(snap / "data" / "test.jsonl", [chat("q", "held out")])
    (cache / "datasets--some-org--chat" / "refs").mkdir()
    (cache / "datasets--some-org--chat" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train = load_datasets(opts(tmp_path, dataset=["some-org/chat#3"], use_hf=True), cache_dir=str(tmp_path / "c")).train
    assert contents(train) == ["a0", "a1", "a2"]


def test_split_val_interleave_and_self_cognition(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat("who are you?", "I am {{NAME}}, made by {{AUTHOR}}."),
                                           {**chat("你是谁", "我是{{NAME}}，由{{AUTHOR}}训练。"), "tag": "zh"}])
    split = load_datasets(opts(tmp_path, dataset=[a], split_dataset_ratio=0.1), cache_dir=str(tmp_path / "c"))
    assert len(split.train) == 18 and len(split.val) == 2
    assert not set(contents(split.train)) & set(contents(split.val))
    val = load_datasets(opts(tmp_path, dataset=[a], val_dataset=[b], split_dataset_ratio=0.1),
                        cache_dir=str(tmp_path / "c"))
    assert len(val.train) == 20 and len(val.val) == 2  # --val_dataset given: no split
    named = load_datasets(opts(tmp_path, dataset=[b], model_name=["小黄", "Xiao Huang"],
                               model_author=["魔搭", "ModelScope"]), cache_dir=str(tmp_path / "c")).train
    assert contents(named) == ["I am Xiao Huang, made by ModelScope.", "我是小黄，由魔搭训练。"]
    mixed = load_datasets(opts(tmp_path, dataset=[a, b], interleave_prob=[0.5, 0.5],
                               stopping_strategy="first_exhausted"), cache_dir=str(tmp_path / "c")).train
    assert 2 <= len(mixed) < 22


# ------------------------------------------------------------------------------------ batching
def test_collator_layouts():
    samples = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]},
               {"input_ids": [4, 5], "labels": [IGNORE, 5]}]
    assert shift_labels([IGNORE, 2, 3]) == [2, 3, IGNORE]
    pad = Collator(pad_token_id=0, padding_free=False)(samples)
    assert pad["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert pad["labels"].tolist() == [[2, 3, IGNORE], [5, IGNORE, IGNORE]]
    assert pad["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]] and "packed_seq_params" not in pad
    assert pad["padding_mask"].tolist() == [[False, False, False], [False, False, True]]
    thd = Collator(pad_token_id=0, padding_free=True, pad_to_multiple_of=4)(samples)
    p = thd["packed_seq_params"]
    assert thd["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert thd["labels"].tolist() == [[2, 3, IGNORE, 5, IGNORE, IGNORE, IGNORE, IGNORE]]  # no cross-boundary target
    assert thd["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert p.qkv_format == "thd" and p.cu_seqlens_q.tolist() == [0, 3, 5, 8] and p.cu_seqlens_q.dtype == torch.int32
    assert p.max_seqlen_q == 3 and p.cu_seqlens_kv is p.cu_seqlens_q
    assert thd["padding_mask"].tolist() == [[False] * 5 + [True] * 3]
    fixed = Collator(pad_token_id=0, padding_free=False, fixed_length=6)(samples)
    assert fixed["input_ids"].shape == (2, 6)
    pair = Collator(pad_token_id=0)([{"chosen_input_ids": [1, 2], "chosen_labels": [IGNORE, 2],
                                      "rejected_input_ids": [3, 4, 5], "rejected_labels": [IGNORE, 4, 5]}])
    assert pair["packed_seq_params"].cu_seqlens_q.tolist() == [0, 2, 5]


def test_pack_lengths_deterministic_and_within_capacity(tmp_path):
    rng = np.random.RandomState(0)
    lengths = np.minimum(rng.zipf(1.5, 2000) * 7, 512)
    packs = pack_lengths(lengths, 512)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert max(lengths[p].sum() for p in packs) <= 512
    assert pack_lengths(lengths, 512) == packs
    assert len(packs) <= int(np.ceil(lengths.sum() / 512) * 1.05) + 1  # near the lower bound
    first = cached_packs(lengths, 512, str(tmp_path))
    assert len(os.listdir(tmp_path)) == 1 and cached_packs(lengths, 512, str(tmp_path)) == first


def test_micro_batch_sampler_dp_slicing_and_resume():
    n, mbs, dp = 23, 2, 3
    ranks = [list(MicroBatchSampler(n, mbs, r, dp, shuffle=True, seed=7, cyclic=False)) for r in range(dp)]
    assert all(len(r) == 3 for r in ranks)  # 23 // 6 steps, last partial step dropped
    step0 = [i for r in range(dp) for i in ranks[r][0]]
    order = MicroBatchSampler(n, mbs, 0, dp, shuffle=True, seed=7).order(0)
    assert step0 == order[:6].tolist()  # rank r takes the r-th slice of each step
    seen = [i for r in ranks for batch in r for i in batch]
    assert len(seen) == len(set(seen)) == 18
    it = iter(MicroBatchSampler(n, mbs, 1, dp, seed=7))
    full = [next(it) for _ in range(8)]  # crosses the epoch boundary (cyclic)
    resumed = iter(MicroBatchSampler(n, mbs, 1, dp, seed=7, consumed_samples=5 * mbs * dp))
    assert [next(resumed) for _ in range(3)] == full[5:]


def args_for(paths, **kw):
    base = dict(command="sft", dataset=paths, val_dataset=[], split_dataset_ratio=0.0, data_seed=42,
                dataset_num_proc=1, load_from_cache_file=True, dataset_shuffle=True, streaming=False, strict=False,
                columns=None, model_name=None, model_author=None, template="qwen2_5", system=None, max_length=64,
                truncation_strategy="delete", loss_scale="default", padding_free=True, packing=False,
                packing_cache=None, micro_batch_size=2, tensor_model_parallel_size=1, sequence_parallel=False,
                pipeline_model_parallel_size=1, hf_config={"model_type": "qwen2"})
    base.update(kw)
    return SftArguments(**base)


def test_prepare_data_end_to_end_with_packing_and_preview(tmp_path, tokenizer):
    rows = [chat("q " * (i % 9), "answer " * (1 + i % 5)) for i in range(30)]
    rows.append(chat("long " * 200, "too long"))  # > max_length with delete: dropped at encode
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_data(args_for([f], packing=True, packing_cache=str(tmp_path / "packs"), dataset_num_proc=2,
                                 max_length=128),
                        tokenizer, cache_dir=str(tmp_path / "c"))
    enc_stats = [s for s in data.stats if s.step == "encode"][0]
    assert enc_stats.kinds == {"too long": 1} and enc_stats.kept == 30
    assert len(data.train) < 30  # packs
    assert os.listdir(tmp_path / "packs")
    batch = next(data.train_iterator(micro_batch_size=2))
    assert set(batch) == {"input_ids", "labels", "position_ids", "padding_mask", "packed_seq_params"}
    cu = batch["packed_seq_params"].cu_seqlens_q.tolist()
    assert batch["input_ids"].shape == (1, cu[-1]) and cu[-1] <= 2 * 128 and len(cu) > 3
    for a, b in zip(cu[:-1], cu[1:]):
        assert batch["position_ids"][0, a:b].tolist() == list(range(b - a))
        assert batch["labels"][0, b - 1] == IGNORE
    text = preview_samples(data.train, tokenizer, n=2)
    assert "[sample 0]" in text and "[-100 * " in text and "<|im_start|>assistant" in text

    # same rows, one process: identical encoding (dataset_num_proc only changes speed)
    one = prepare_data(args_for([f], max_length=128), tokenizer, cache_dir=str(tmp_path / "c1"))
    assert sorted(map(tuple, one.train["input_ids"])) == sorted(
        tuple(s["input_ids"]) for i in range(len(data.train)) for s in data.train[i])


def test_streaming_iterator(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(9)])
    data = prepare_data(args_for([f], streaming=True, dataset_shuffle=False), tokenizer, cache_dir=str(tmp_path / "c"))
    batches = [next(data.train_iterator(micro_batch_size=2, dp_rank=1, dp_size=2)) for _ in range(1)]
    assert batches[0]["packed_seq_params"].cu_seqlens_q.numel() == 3


# ------------------------------------------------------------------------------------ model oracle
def test_padded_padding_free_and_packed_losses_match(megatron_world1, tokenizer):
    """Per-token losses of one mixed-length batch: padded == padding-free (THD) == packed (fp32)."""
    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config

    chunks, _, _ = build_model(tiny_hf_config("qwen3"))
    model = chunks[0].eval()
    template = get_template(tokenizer, "qwen2_5", loss_scale="default")
    convs = [chat("hi", "hello there"), chat("what is the weather today in the city?", "hot"),
             chat("1 2 3 4 5 6 7 8 9 10 11 12", "thirteen fourteen fifteen sixteen seventeen eighteen"),
             chat("why", "because."), chat("a", "b"), chat("data model train", "loss token batch answer " * 3)]
    samples = [template.encode(c) for c in convs]
    assert len({len(s["input_ids"]) for s in samples}) > 3  # mixed lengths

    def per_sequence_losses(batch):
        with torch.no_grad():
            loss = model(batch["input_ids"], batch["position_ids"], attention_mask=None,
                         labels=batch["labels"].clamp(min=0), packed_seq_params=batch.get("packed_seq_params"))
        labels = batch["labels"]
        if "packed_seq_params" not in batch:
            return [loss[r][labels[r].ne(IGNORE)] for r in range(labels.shape[0])]
        cu = batch["packed_seq_params"].cu_seqlens_q.tolist()
        return [loss[0, a:b][labels[0, a:b].ne(IGNORE)] for a, b in zip(cu[:-1], cu[1:])]

    padded = per_sequence_losses(Collator(tokenizer.pad_token_id, padding_free=False)(samples))
    thd = per_sequence_losses(Collator(tokenizer.pad_token_id, padding_free=True, pad_to_multiple_of=8)(samples))
    packs = pack_lengths([len(s["input_ids"]) for s in samples], 100)
    assert max(len(p) for p in packs) > 1
    packed_batch = Collator(tokenizer.pad_token_id)([[samples[i] for i in p] for p in packs])
    packed_out = per_sequence_losses(packed_batch)
    order = [i for p in packs for i in p]
    packed = [None] * len(samples)
    for pos, i in enumerate(order):
        packed[i] = packed_out[pos]
    for i in range(len(samples)):
        assert padded[i].numel() == sum(1 for t in samples[i]["labels"][1:] if t != IGNORE)
        torch.testing.assert_close(thd[i], padded[i], rtol=0, atol=2e-5)
        torch.testing.assert_close(packed[i], padded[i], rtol=0, atol=2e-5)
    total = [sum(float(x.double().sum()) for x in v) for v in (padded, thd, packed)]
    assert abs(total[0] - total[1]) < 1e-3 and abs(total[0] - total[2]) < 1e-3
