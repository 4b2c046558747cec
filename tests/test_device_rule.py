"""The device rule for collectives (chunkflow/parallel/comm.py), checked without a GPU.

What these tests prove here, and what they cannot: see comm.py's module docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from chunkflow.parallel import comm

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "chunkflow"

# torch.distributed calls that move tensors between ranks (barrier carries none of ours).
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
    "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
    "gather_object", "scatter", "scatter_object_list", "all_to_all", "all_to_all_single",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "P2POp", "send_object_list",
    "recv_object_list",
}
P2P = {"send", "recv", "isend", "irecv", "batch_isend_irecv", "P2POp"}
# file -> names it may use directly
ALLOWED = {
    "chunkflow/parallel/comm.py": COLLECTIVES,
    "chunkflow/pipeline/executor.py": P2P,  # forward-only evaluation: buffers on the stage's device
    "chunkflow/pipeline/p2p.py": P2P,  # sends through comm.p2p_placed, receives on comm.comm_device
}


def direct_collectives(source: str) -> list[tuple[int, str]]:
    """(line, name) of every torch.distributed collective used directly in ``source``."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"}  # dotted names that mean torch.distributed
    bare: dict[str, str] = {}  # local name -> collective imported from torch.distributed
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if node.module == "torch" and a.name == "distributed":
                    aliases.add(a.asname or a.name)
                elif node.module.startswith("torch.distributed") and a.name in COLLECTIVES:
                    bare[a.asname or a.name] = a.name

    def dotted(n: ast.AST) -> str:
        if isinstance(n, ast.Name):
            return n.id
        if isinstance(n, ast.Attribute):
            return f"{dotted(n.value)}.{n.attr}"
        return ""

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and dotted(node.value) in aliases:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name) and node.id in bare and isinstance(node.ctx, ast.Load):
            found.append((node.lineno, bare[node.id]))
    return sorted(found)


def test_every_collective_goes_through_comm():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED.get(rel, set())
        for line, name in direct_collectives(path.read_text()):
            if name not in allowed:
                offenders.append(f"{rel}:{line}: torch.distributed.{name}")
    assert not offenders, ("collectives outside chunkflow/parallel/comm.py (use comm.*, which puts "
                           "tensors on the group's device):\n" + "\n".join(offenders))


def test_scanner_finds_every_spelling():
    src = (
        "import torch\nimport torch.distributed as dist\nfrom torch import distributed as D\n"
        "from torch.distributed import all_gather as ag\n"
        "dist.all_reduce(t)\nD.broadcast(t, 0)\ntorch.distributed.send(t, 1)\nag(ps, t)\n"
        "dist.P2POp(dist.isend, t, 1)\ndist.barrier()\ndist.get_rank()\n"
    )
    assert direct_collectives(src) == [
        (5, "all_reduce"), (6, "broadcast"), (7, "send"), (8, "all_gather"),
        (9, "P2POp"), (9, "isend"),
    ]


# ---------------------------------------------------------------------- comm with a faked backend
@pytest.fixture
def fake_backend(monkeypatch):
    def use(name: str) -> list:
        monkeypatch.setattr(dist, "get_backend", lambda group=None: name)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        seen: list = []

        def fake_all_reduce(t, op=None, group=None, async_op=False):
            seen.append(t)
            t.mul_(2)  # two ranks holding the same value

        monkeypatch.setattr(comm.dist, "all_reduce", fake_all_reduce)
        return seen

    return use


def test_backend_devices():
    assert comm.backend_devices("gloo") == ("cpu",)
    assert comm.backend_devices("nccl") == ("cuda",)
    assert comm.backend_devices("cpu:gloo,cuda:nccl") == ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown process-group backend"):
        comm.backend_devices("ncll")


def test_comm_device_follows_the_group(fake_backend):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)
    fake_backend("gloo")
    assert comm.comm_device(None, prefer=cuda).type == "cpu"
    fake_backend("nccl")
    assert comm.comm_device(None, prefer=cpu).type == "cuda"
    assert comm.comm_device(None).type == "cuda"
    fake_backend("cpu:gloo,cuda:nccl")
    assert comm.comm_device(None, prefer=cpu) == cpu  # host scalars stay on the host
    assert comm.comm_device(None, prefer=cuda) == cuda  # GPU tensors stay on the GPU
    assert comm.comm_device(None).type == "cuda"


def test_all_reduce_moves_a_host_tensor_to_an_nccl_groups_device(fake_backend, monkeypatch):
    seen = fake_backend("nccl")
    moved: list = []

    def fake_to(self, device, *args, **kwargs):  # a CPU torch cannot make CUDA tensors
        moved.append(torch.device(device))
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    t = torch.tensor([1.5, 2.0], dtype=torch.float64)
    out = comm.all_reduce(t, group=None)
    assert [d.type for d in moved] == ["cuda"]
    assert seen[0] is not t  # the collective got the moved copy ...
    assert out is t and t.tolist() == [3.0, 4.0]  # ... and the result came back in place


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:nccl"])
def test_all_reduce_keeps_a_host_tensor_where_the_group_takes_it(fake_backend, backend):
    seen = fake_backend(backend)
    t = torch.ones(3)
    comm.all_reduce(t, op="max")
    assert seen[0] is t and t.tolist() == [2.0, 2.0, 2.0]


def test_strict_check_rejects_a_host_tensor_on_nccl(monkeypatch):
    assert getattr(dist.all_reduce, "_chunkflow_strict", False), "conftest installs strict mode"
    assert getattr(dist.batch_isend_irecv, "_chunkflow_strict", False)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(comm.DeviceRuleError, match="a cpu tensor .* takes \\['cuda'\\]"):
        dist.all_reduce(torch.ones(2))  # raises before torch looks for a process group
    with pytest.raises(comm.DeviceRuleError, match="torch.distributed.all_gather"):
        dist.all_gather([torch.ones(2)], torch.ones(2))
    with pytest.raises(comm.DeviceRuleError, match="torch.distributed.send"):
        dist.send(torch.ones(2), 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    comm.check_devices("all_reduce", [torch.ones(2)], None)  # mixed: gloo takes it


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo"])
def test_strict_check_on_a_real_gloo_group(tmp_path, backend):
    """A real one-rank group: what torch reports as its backend parses, a host tensor
    passes, and a tensor on another device is stopped before it reaches gloo."""
    dist.init_process_group(backend, rank=0, world_size=1, init_method=f"file://{tmp_path}/store")
    try:
        assert comm.backend_devices(dist.get_backend()) == ("cpu",)
        assert comm.comm_device(None, prefer=torch.device("meta")) == torch.device("cpu")
        assert comm.all_reduce(torch.ones(2), op="max").tolist() == [1.0, 1.0]
        assert comm.reduce_scalars([2.5]) == [2.5]
        with pytest.raises(comm.DeviceRuleError, match="a meta tensor"):
            dist.all_reduce(torch.empty(2, device="meta"))
    finally:
        dist.destroy_process_group()
