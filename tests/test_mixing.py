"""The mixed-batch API: adapter files through slotted models, run-time stacks, folding one adapter, the
proof's power to fail, and one-line refusals."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import MODELS, rel_err, run
from mixed_builders import rows_alone_with_files, run_rows, slotted_with_files
from swap_builders import load_adapter, mixed_feeds, mixed_model, session

import lora_onnx
from lora_onnx import LoraConfig, TargetSelector
from lora_onnx.adapters.files import write_adapter_file
from lora_onnx.commands.inject_mixed import inject_mixed, proof_rows, prove_rows, stack_adapters
from lora_onnx.commands.swap import fresh_source, inject_slots
from lora_onnx.errors import AdapterError, FoldError, LoraOnnxError, OutputError
from lora_onnx.model.load import load_model
from lora_onnx.proofs.batch_rows import batch_axes
from lora_onnx.stages.stacked import INDEX_INPUT, mixed_records


def test_files_map_to_sites_through_the_model_or_a_separate_slotted_model(tmp_path: Path) -> None:
    base = tmp_path / "base.onnx"
    onnx.save(mixed_model(), base)
    slots, files = slotted_with_files(base, tmp_path, (2, 4), drop=("fc1", "fc3"))
    through_model = inject_mixed(slots, files, validate=True)
    through_slots = inject_mixed(base, files, slots=slots, validate=True)
    for result in (through_model, through_slots):
        assert result.validation is not None and result.validation.ok
        assert result.adapters == tuple(str(f) for f in files)
    rows = [1, 0, -1, 1]
    feeds = mixed_feeds(batch=len(rows))
    one, two = (
        run_rows(through_model.model.proto, feeds, rows),
        run_rows(through_slots.model.proto, feeds, rows),
    )
    alone = rows_alone_with_files(slots, files, feeds, rows)
    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        assert np.array_equal(a, b)
        for row in range(len(rows)):
            assert rel_err(a[row : row + 1], alone[row][i]) <= 1e-4
    fc1 = next(r for r in through_model.branches if r.module_path == "fc1")
    a_stack = through_model.model.array(fc1.a)
    assert a_stack.shape == (2, 8, 2) and not a_stack[1].any()  # adapter 1 leaves fc1 out: zeros


def test_refusals_are_one_line_user_errors(tmp_path: Path) -> None:
    base = mixed_model()
    two = inject_slots(base, LoraConfig(rank=2)).model
    two = inject_slots(
        two, LoraConfig(rank=2, adapter_name="other", targets=TargetSelector(names=("fc3",)))
    ).model
    slots = lora_onnx.save_model(two, tmp_path / "slots.onnx")
    both = {
        "fc1.lora_A.weight": np.ones((8, 2), np.float32),
        "fc1.lora_B.weight": np.ones((2, 16), np.float32),
        "fc3.other.lora_A.weight": np.ones((12, 2), np.float32),
        "fc3.other.lora_B.weight": np.ones((2, 6), np.float32),
    }
    with pytest.raises(AdapterError, match=r"addresses the slots of adapters \['default', 'other'\]"):
        inject_mixed(slots, [write_adapter_file(both, tmp_path / "both.npz")])
    bad = write_adapter_file({"fc1.lora_A.weight": np.ones((7, 2), np.float32)}, tmp_path / "bad.npz")
    with pytest.raises(AdapterError, match=r"bad\.npz does not fit .*mis-shaped"):
        inject_mixed(slots, [bad])
    good = write_adapter_file({k: v for k, v in both.items() if "other" not in k}, tmp_path / "good.npz")
    with pytest.raises(AdapterError, match="has none; give the slotted model"):
        inject_mixed(base, [good])
    bert_slots = inject_slots(MODELS / "tiny_bert" / "model.onnx", LoraConfig(rank=2)).model
    with pytest.raises(AdapterError, match="does not fit"):
        inject_mixed(base, [good], slots=bert_slots)
    with pytest.raises(AdapterError, match="no such adapter file or PEFT adapter folder"):
        inject_mixed(base, [tmp_path / "missing.npz"])
    with pytest.raises(AdapterError, match="at least one adapter"):
        inject_mixed(base, [])
    empty = write_adapter_file(
        {"fc1.lora_A.weight": np.ones((8, 0), np.float32), "fc1.lora_B.weight": np.ones((0, 16), np.float32)},
        tmp_path / "empty.npz",
    )
    with pytest.raises(AdapterError, match="has no branch at any site"):
        inject_mixed(slots, [empty])
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        inject_mixed(slots, [good], output=good)
    mixed = inject_mixed(slots, [good]).model
    with pytest.raises(LoraOnnxError, match="already has mixed-batch branches"):
        inject_mixed(mixed, [good], slots=slots)
    assert not list(tmp_path.glob("*.onnx.*"))  # nothing else was written


def test_a_folder_without_a_peft_adapter_is_named(tmp_path: Path) -> None:
    with pytest.raises(LoraOnnxError, match=re.escape(str(tmp_path))):
        inject_mixed(mixed_model(), [tmp_path])


def test_stacks_as_inputs_take_other_adapters_per_run(tmp_path: Path) -> None:
    base = tmp_path / "base.onnx"
    onnx.save(mixed_model(), base)
    slots, files = slotted_with_files(base, tmp_path, (2, 4, 6, 8), drop=("fc4",))
    mixed = inject_mixed(
        slots, files[:2], stacks_as_inputs=True, output=tmp_path / "mixed.onnx", validate=True
    )
    assert mixed.validation is not None and mixed.validation.ok
    # three other adapters (ranks 8, 6, 2; the rank-8 one leaves fc4 out), in a file onnxruntime activates
    order = [files[3], files[2], files[0]]
    stack_adapters(mixed.output, order, slots=slots, output=tmp_path / "stacks.onnx_adapter")
    rows = [0, 2, -1, 1, 0]
    feeds = mixed_feeds(batch=len(rows))
    sess = session(mixed.output)
    stacks = load_adapter(tmp_path / "stacks.onnx_adapter")  # RunOptions does not keep it alive: we do
    got = sess.run(None, {**feeds, INDEX_INPUT: np.array(rows)}, run_options(stacks))
    alone = rows_alone_with_files(slots, order, feeds, rows)
    for i, out in enumerate(got):
        for row in range(len(rows)):
            assert rel_err(out[row : row + 1], alone[row][i]) <= 1e-4
    # the stacks built in still apply when no stack file is active
    default = sess.run(None, {**feeds, INDEX_INPUT: np.array(rows) % 2})
    alone = rows_alone_with_files(slots, files[:2], feeds, [r % 2 for r in rows])
    assert all(rel_err(default[0][r : r + 1], alone[r][0]) <= 1e-4 for r in range(len(rows)))
    # refusals: constant stacks, and an adapter at a site without a mixed branch
    constant = inject_mixed(slots, files[:2]).model
    with pytest.raises(AdapterError, match="stacks are constants"):
        stack_adapters(constant, order, slots=slots)
    no_fc4 = inject_mixed(slots, [files[3]], stacks_as_inputs=True).model
    with pytest.raises(AdapterError, match=r"adapts fc4, which has no mixed branch"):
        stack_adapters(no_fc4, [files[0]], slots=slots)


def run_options(*adapters: ort.LoraAdapter) -> ort.RunOptions:
    options = ort.RunOptions()
    for adapter in adapters:
        options.add_active_adapter(adapter)
    return options


def test_merge_adapter_index_folds_one_adapter_into_a_plain_model(tmp_path: Path) -> None:
    base = mixed_model()
    loaded = load_model(base)
    # (fc3's weight is float16: a fold into it rounds beyond fp32's default tolerance, so it is left out)
    configs = [
        LoraConfig(rank=2, alpha=3, init="random", seed=1, targets=TargetSelector(exclude=("fc3",))),
        LoraConfig(rank=4, alpha=2, init="random", seed=2, targets=TargetSelector(exclude=("fc1", "fc3"))),
    ]
    sources = [fresh_source(loaded, c) for c in configs]
    mixed = inject_mixed(base, sources, stacks_as_inputs=True, output=tmp_path / "mixed.onnx")
    with pytest.raises(FoldError, match=r"merge --adapter-index I"):
        lora_onnx.merge(mixed.output)
    with pytest.raises(LoraOnnxError, match=r"stacks 2 adapter\(s\) .*there is no index 2"):
        lora_onnx.merge(mixed.output, adapter_index=2)
    feeds = mixed_feeds(batch=3)
    for index, config in enumerate(configs):
        merged = lora_onnx.merge(
            mixed.output, output=tmp_path / f"m{index}.onnx", adapter_index=index, validate=True
        )
        assert merged.validation is not None and merged.validation.ok
        assert len(merged.folded) == (4 if index == 0 else 3)  # adapter 1 has no fc1 branch
        proto = onnx.load(tmp_path / f"m{index}.onnx")
        assert [n.name for n in proto.graph.node] == [n.name for n in base.graph.node]
        assert [i.name for i in proto.graph.input] == [i.name for i in base.graph.input]
        assert not [t.name for t in proto.graph.initializer if "stack" in t.name or "index" in t.name]
        constant = lora_onnx.inject(base, config).model  # the same adapter as ordinary constant branches
        for got, want in zip(run(proto, feeds), run(constant.proto, feeds), strict=True):
            assert rel_err(got, want) <= 1e-4


def test_the_row_proof_fails_when_a_stack_holds_the_wrong_adapter() -> None:
    base = mixed_model()
    loaded = load_model(base)
    configs = [LoraConfig(rank=2, alpha=4, init="random", seed=s) for s in (1, 2)]
    result = inject_mixed(base, [fresh_source(loaded, c) for c in configs])
    references = [lora_onnx.inject(base, c).model for c in configs]
    axes = batch_axes(loaded)
    rows = proof_rows(2)
    assert prove_rows(result.model, loaded, references, rows, axes).ok
    proto = onnx.ModelProto()
    proto.CopyFrom(result.model.proto)
    conv = next(r for r in mixed_records(result.model) if r.module_path == "conv")
    tensor = next(t for t in proto.graph.initializer if t.name == conv.b)
    swapped = onnx.numpy_helper.to_array(tensor)[::-1].copy()  # adapters 0 and 1 trade places at one site
    tensor.CopyFrom(onnx.numpy_helper.from_array(swapped, conv.b))
    report = prove_rows(result.model.with_proto(proto), loaded, references, rows, axes)
    assert [c.name for c in report.failures] == ["c"]  # only the conv's output is wrong


def test_a_mixed_model_takes_constant_branches_and_validates_with_generated_inputs(tmp_path: Path) -> None:
    base = mixed_model()
    loaded = load_model(base)
    mixed = inject_mixed(
        base, [fresh_source(loaded, LoraConfig(rank=2, init="random", seed=s)) for s in (1, 2)]
    )
    extra = LoraConfig(rank=2, init="random", adapter_name="extra", targets=TargetSelector(names=("conv",)))
    stacked = lora_onnx.inject(mixed.model, extra, validate=True)  # generated inputs: index 0 on every row
    assert stacked.validation is not None and stacked.validation.ok
    assert {b.variant for b in stacked.branches} == {"constant"}
    saved = lora_onnx.save_model(stacked.model, tmp_path / "stacked.onnx")
    rows = [1, -1, 0]
    feeds = mixed_feeds(batch=3)
    got = run_rows(saved, feeds, rows)
    want = run_rows(mixed.model.proto, feeds, rows)
    plain = lora_onnx.inject(base, extra).model
    # the constant conv adapter applies to every row, beside each row's own conv adapter
    delta = run(plain.proto, feeds)[2] - run(base, feeds)[2]
    assert rel_err(got[2], want[2] + delta) <= 1e-4 and rel_err(got[2], want[2]) > 1e-3
    assert all(rel_err(g, w) <= 1e-6 for g, w in zip(got[:2], want[:2], strict=True))
