"""``inject --mixed`` on models whose batch size is fixed (dynamo exports without dynamic_shapes).

The index input then has that fixed length; the proof compares each row of a mixed batch with the same
row of its adapter's reference run on the same batch. References here are independent of the mixed
graph: float64 numpy forward passes with each row's adapter applied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, rel_err, rng_array, run
from mixed_builders import run_rows
from onnx import TensorProto, helper, numpy_helper
from test_cli import cli

from lora_onnx import LoraConfig
from lora_onnx.commands.inject_mixed import inject_mixed, proof_rows, prove_rows
from lora_onnx.commands.swap import AdapterSource, fresh_source
from lora_onnx.model.load import LoadedModel, load_model
from lora_onnx.proofs.batch_rows import batch_axes, probe_sites
from lora_onnx.sites.find import DEFAULT_OPS, scan_sites
from lora_onnx.stages.stacked import INDEX_INPUT, mixed_records

F = TensorProto.FLOAT
BATCH = 4


def _static_model(batch: int = BATCH) -> onnx.ModelProto:
    """x [batch, 5, 8] -> MatMul + bias -> Relu -> MatMul, as a dynamo export with a fixed batch."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["mm"], name="/fc1/MatMul"),
        helper.make_node("Add", ["mm", "b1"], ["h"], name="/fc1/Add"),
        helper.make_node("Relu", ["h"], ["r"], name="/act/Relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="/fc2/MatMul"),
    ]
    inits = {"W1": rng_array((8, 16), 1), "b1": rng_array((16,), 2), "W2": rng_array((16, 6), 3)}
    return make_model(nodes, {"x": (F, [batch, 5, 8])}, ["y"], inits)


def _numpy_forward(
    weights: dict[str, np.ndarray], x: np.ndarray, adapter: AdapterSource | None
) -> np.ndarray:
    """:func:`_static_model` in float64 with ``adapter``'s branches (s * (x A) B at each site)."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    branches = {}
    if adapter is not None:
        for plan in adapter.plans:
            a = adapter.values[plan.a_name].astype(np.float64)
            branches[plan.site.node] = (a, adapter.values[plan.b_name].astype(np.float64), plan.scale)

    def delta(node: str, value: np.ndarray) -> np.ndarray | float:
        if node not in branches:
            return 0.0
        a, b, s = branches[node]
        return s * (value @ a) @ b

    x = x.astype(np.float64)
    h = np.maximum(x @ w["W1"] + w["b1"] + delta("/fc1/MatMul", x), 0.0)
    return h @ w["W2"] + delta("/fc2/MatMul", h)


def _adapters(model: onnx.ModelProto, count: int = 3) -> list[AdapterSource]:
    loaded = load_model(model)
    return [
        fresh_source(loaded, LoraConfig(rank=r, alpha=r + 1, init="random", seed=r))
        for r in range(2, 2 + count)
    ]


def test_a_fixed_batch_gets_a_fixed_length_index_and_each_row_equals_numpy_with_its_adapter() -> None:
    base = _static_model()
    adapters = _adapters(base)
    result = inject_mixed(base, adapters, validate=True)
    assert result.validation is not None and result.validation.ok and not result.skipped
    assert result.batch_size == BATCH
    # every adapter and the base appear in the proof, in whole batches of the fixed size
    assert len(result.rows) % BATCH == 0 and set(result.rows) == {-1, 0, 1, 2}
    index = next(i for i in result.model.proto.graph.input if i.name == INDEX_INPUT)
    assert [d.dim_value for d in index.type.tensor_type.shape.dim] == [BATCH]
    assert {r.module_path for r in mixed_records(result.model)} == {"fc1", "fc2"}

    weights = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer}
    x = rng_array((BATCH, 5, 8), 9)
    for rows in ([1, -1, 0, 2], [2, 2, -1, 1]):
        (got,) = run_rows(result.model.proto, {"x": x}, rows)
        for b, r in enumerate(rows):
            want = _numpy_forward(weights, x[b : b + 1], None if r < 0 else adapters[r])
            assert rel_err(got[b : b + 1], want) <= 1e-4
            plain = _numpy_forward(weights, x[b : b + 1], None)
            if r >= 0:
                assert rel_err(want, plain) > 1e-3  # the adapter really changes the row
            else:
                assert rel_err(got[b : b + 1], plain) <= 1e-5


def test_the_index_must_have_the_fixed_length() -> None:
    result = inject_mixed(_static_model(), _adapters(_static_model(), 1))
    with pytest.raises(Exception, match="lora_adapter_index"):
        run_rows(result.model.proto, {"x": rng_array((BATCH, 5, 8), 9)}, [0, -1])


def test_the_fixed_batch_proof_fails_when_a_stack_holds_the_wrong_adapter() -> None:
    base = _static_model()
    loaded = load_model(base)
    adapters = _adapters(base, 2)
    result = inject_mixed(base, adapters)
    references = [_reference(base, a) for a in adapters]
    axes = batch_axes(loaded)
    rows = proof_rows(2, axes.size)
    assert axes.size == BATCH and rows == (0, -1, 1, 0)
    assert prove_rows(result.model, loaded, references, rows, axes).ok
    proto = onnx.ModelProto()
    proto.CopyFrom(result.model.proto)
    fc2 = next(r for r in mixed_records(result.model) if r.module_path == "fc2")
    tensor = next(t for t in proto.graph.initializer if t.name == fc2.b)
    swapped = numpy_helper.to_array(tensor)[::-1].copy()  # adapters 0 and 1 trade places at one site
    tensor.CopyFrom(numpy_helper.from_array(swapped, fc2.b))
    report = prove_rows(result.model.with_proto(proto), loaded, references, rows, axes)
    assert [c.name for c in report.failures] == ["y"]


def _reference(base: onnx.ModelProto, adapter: AdapterSource) -> LoadedModel:
    """``base`` with ``adapter`` as ordinary constant branches."""
    from lora_onnx.stages.insert import insert_branches

    return insert_branches(load_model(base), list(adapter.plans), dict(adapter.values)).model


def test_the_fixed_batch_probe_skips_a_site_whose_rows_mix() -> None:
    # y = x^T W: the site's input [8, 4] holds one column per batch row, so its 4 blocks mix rows
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], name="/t/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["xt", "W"], ["y"], name="/fc/MatMul"),
        helper.make_node("MatMul", ["x", "V"], ["z"], name="/ok/MatMul"),
    ]
    model = load_model(
        make_model(
            nodes, {"x": (F, [4, 8])}, ["y", "z"], {"W": rng_array((4, 2), 1), "V": rng_array((8, 3), 2)}
        )
    )
    axes = batch_axes(model)
    assert (axes.name, axes.size, dict(axes.inputs)) == ("", 4, {"x": 0})
    probe = probe_sites(model, scan_sites(model, DEFAULT_OPS).sites, axes)
    assert [s.node for s in probe.kept] == ["/ok/MatMul"]
    assert [s.node for s in probe.skipped] == ["/fc/MatMul"] and "mix batch rows" in probe.skipped[0].reason


def test_a_batch_of_one_proves_every_adapter_in_its_own_batch() -> None:
    base = _static_model(batch=1)
    adapters = _adapters(base, 2)
    result = inject_mixed(base, adapters, validate=True)
    assert result.validation is not None and result.validation.ok
    assert result.rows == (0, -1, 1, 0) and result.batch_size == 1
    assert len(result.validation.comparisons) == 4  # one output per one-row batch
    weights = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer}
    x = rng_array((1, 5, 8), 4)
    for r in (-1, 0, 1):
        (got,) = run_rows(result.model.proto, {"x": x}, [r])
        assert rel_err(got, _numpy_forward(weights, x, None if r < 0 else adapters[r])) <= 1e-4


@pytest.mark.slow
def test_a_static_dynamo_export_mixes_rows_on_the_command_line(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    module = Mlp().eval()
    base = tmp_path / "static.onnx"
    torch.onnx.export(module, (torch.randn(3, 5, 8),), base, dynamo=True)  # no dynamic_shapes: batch 3
    exported = onnx.load(base)
    assert exported.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    slots = tmp_path / "slots.onnx"
    assert cli("inject", base, "-o", slots, "--as-inputs").returncode == 0
    files = []
    for i, rank in enumerate((2, 4)):
        file = tmp_path / f"a{i}.onnx_adapter"
        made = cli("inject", base, "-o", tmp_path / f"c{i}.onnx", "--rank", str(rank), "--init", "random",
                   "--seed", str(i), "--adapter-out", file, "--as-inputs")  # fmt: skip
        assert made.returncode == 0, made.stderr
        files.append(file)
    mixed = tmp_path / "mixed.onnx"
    done = cli("inject", slots, "--mixed", "--adapter-file", files[0], "--adapter-file", files[1],
               "-o", mixed, "--validate")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "fixed size 3" in done.stdout + done.stderr
    index = next(i for i in onnx.load(mixed).graph.input if i.name == INDEX_INPUT)
    assert [d.dim_value for d in index.type.tensor_type.shape.dim] == [3]
    # row by row against torch with each row's adapter: LoRA on fc1 / fc2 from the file's tensors
    from lora_onnx.adapters.files import read_adapter_file

    x = torch.randn(3, 5, 8)
    rows = [1, -1, 0]
    (got,) = run_rows(mixed, {"x": x.numpy()}, rows)
    for b, r in enumerate(rows):
        with torch.no_grad():
            xb = x[b : b + 1].double()
            h = xb @ module.fc1.weight.double().T + module.fc1.bias.double()
            tensors = read_adapter_file(files[r]).tensors if r >= 0 else {}
            assert r < 0 or {"fc1", "fc2"} <= {k.split(".")[0] for k in tensors}  # both sites found

            def lora(name: str, value: torch.Tensor, tensors: dict = tensors) -> torch.Tensor:
                a = next((v for k, v in tensors.items() if name in k and "lora_A" in k), None)
                b_ = next((v for k, v in tensors.items() if name in k and "lora_B" in k), None)
                if a is None or b_ is None:
                    return torch.zeros(())
                return (
                    value
                    @ torch.from_numpy(np.asarray(a)).double()
                    @ torch.from_numpy(np.asarray(b_)).double()
                )

            h = torch.relu(h + lora("fc1", xb))
            want = h @ module.fc2.weight.double().T + module.fc2.bias.double() + lora("fc2", h)
        assert rel_err(got[b : b + 1], want.numpy()) <= 1e-4


def test_one_adapter_of_a_fixed_batch_mixed_model_folds_into_a_plain_model(tmp_path: Path) -> None:
    from lora_onnx.commands.merge import merge

    base = _static_model()
    adapters = _adapters(base, 2)
    mixed = inject_mixed(base, adapters, output=tmp_path / "mixed.onnx")
    merged = merge(tmp_path / "mixed.onnx", adapter_index=1, validate=True, output=tmp_path / "one.onnx")
    assert merged.validation is not None and merged.validation.ok and mixed.output is not None
    folded = onnx.load(tmp_path / "one.onnx")
    assert INDEX_INPUT not in {i.name for i in folded.graph.input}
    weights = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer}
    x = rng_array((BATCH, 5, 8), 6)
    (got,) = run(folded, {"x": x})
    assert rel_err(got, _numpy_forward(weights, x, adapters[1])) <= 1e-4
