"""Validation that reads tensor values on the host: cu_seqlens' cache, unreadable values, the KV cache's devices."""

from __future__ import annotations

import struct

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from flashattn_py import InputError, attention_varlen, attention_with_kvcache, ops
from flashattn_py import _validation as validation
from flashattn_py._validation import check_cu_seqlens, check_kvcache, values_unreadable

CPU = torch.device("cpu")


def _int32_buffer(values):
    buf = bytearray(4 * len(values))
    struct.pack_into(f"={len(values)}i", buf, 0, *values)
    return buf


# --- check_cu_seqlens' cache of validated offsets ---------------------------------------------------------------

def test_new_tensor_at_a_freed_address_is_revalidated():
    """A freed cu_seqlens' memory reused by a new tensor (same data_ptr, _version 0 again, new contents) is read
    afresh: the cache is keyed on the tensor object, not on its address and version."""
    buf = _int32_buffer([0, 3, 5])
    cu1 = torch.frombuffer(buf, dtype=torch.int32)  # the allocator's memory, as a tensor at version 0
    assert check_cu_seqlens(cu1, "cu_seqlens_q", 5, 3, CPU) == 2
    address = cu1.data_ptr()
    del cu1
    struct.pack_into("=3i", buf, 0, 0, 5, 3)  # the memory's next owner writes decreasing offsets
    cu2 = torch.frombuffer(buf, dtype=torch.int32)
    assert cu2.data_ptr() == address and cu2._version == 0
    with pytest.raises(InputError, match="never decrease"):
        check_cu_seqlens(cu2, "cu_seqlens_q", 5, 3, CPU)


def test_live_tensor_sharing_an_address_is_revalidated():
    """Two tensors over one memory, neither freed: validating one says nothing about the other's later contents."""
    buf = _int32_buffer([0, 3, 5])
    a = torch.frombuffer(buf, dtype=torch.int32)
    assert check_cu_seqlens(a, "cu_seqlens_k", 5, 3, CPU) == 2
    struct.pack_into("=3i", buf, 0, 0, 3, 9)  # written behind both tensors' version counters
    b = torch.frombuffer(buf, dtype=torch.int32)
    with pytest.raises(InputError, match="ends at 9"):
        check_cu_seqlens(b, "cu_seqlens_k", 5, 3, CPU)


def test_cache_reads_each_tensor_once_and_again_after_in_place_changes(monkeypatch):
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    for _ in range(3):  # one model, many layers
        assert check_cu_seqlens(cu, "cu_seqlens_q", 5, 3, CPU) == 2
    assert len(reads) == 1
    check_cu_seqlens(cu, "cu_seqlens_q", 5, 4, CPU)  # another max_seqlen is another check
    check_cu_seqlens(cu, "cu_seqlens_q", 5, 3, CPU)
    assert len(reads) == 2
    cu[2] = 2  # in place: decreasing now
    with pytest.raises(InputError, match="never decrease"):
        check_cu_seqlens(cu, "cu_seqlens_q", 5, 3, CPU)


def test_cache_entry_dies_with_its_tensor():
    cu = torch.tensor([0, 1], dtype=torch.int32)
    check_cu_seqlens(cu, "cu_seqlens_q", 1, 1, CPU)
    assert cu in validation._validated_offsets
    before = len(validation._validated_offsets)
    del cu
    assert len(validation._validated_offsets) == before - 1


def test_inference_tensors_are_read_every_time():
    """torch.inference_mode tensors have no version counter; they are validated on every call, not refused."""
    with torch.inference_mode():
        cu = torch.tensor([0, 3, 5], dtype=torch.int32)
        assert check_cu_seqlens(cu, "cu_seqlens_q", 5, 3, CPU) == 2
        cu[1] = 6  # an in-place change no version counter sees
        with pytest.raises(InputError, match="never decrease"):
            check_cu_seqlens(cu, "cu_seqlens_q", 5, 3, CPU)


def test_varlen_under_inference_mode_refuses_bad_offsets_before_launch():
    q, k, v = (torch.randn(5, 2, 16) for _ in range(3))
    before = sum(ops.launch_counts.values())
    with torch.inference_mode():
        cu = torch.tensor([0, 4, 3], dtype=torch.int32)
        with pytest.raises(InputError, match="never decrease"):
            attention_varlen(q, k, v, cu, cu, 4, 4)
    assert sum(ops.launch_counts.values()) == before


# --- values that cannot be read -----------------------------------------------------------------------------------

def test_fake_cuda_tensors_exist_without_a_gpu():
    with FakeTensorMode(allow_non_fake_inputs=False):
        assert torch.empty(3, device="cuda").device.type == "cuda"


@pytest.mark.parametrize("values", [[0, 3, 5], [0, 9, 2]])
def test_fake_offsets_are_not_read(values):
    """Under FakeTensorMode (torch.export, tracing) the offsets have no values: only metadata is checked."""
    with FakeTensorMode(allow_non_fake_inputs=False):
        cu = torch.tensor(values, dtype=torch.int32, device="cuda")
        device = torch.empty(1, device="cuda").device
        assert values_unreadable(cu)
        assert check_cu_seqlens(cu, "cu_seqlens_q", 5, 3, device) == 2
        with pytest.raises(InputError, match="1-D int32"):  # the metadata is still checked
            check_cu_seqlens(cu.long(), "cu_seqlens_q", 5, 3, device)
        with pytest.raises(InputError, match="inputs' device"):
            check_cu_seqlens(torch.zeros(3, dtype=torch.int32), "cu_seqlens_q", 5, 3, device)


def test_varlen_traces_under_fake_tensor_mode():
    with FakeTensorMode(allow_non_fake_inputs=False):
        q, k, v = (torch.randn(8, 2, 16, device="cuda") for _ in range(3))
        cu = torch.tensor([0, 3, 8], dtype=torch.int32, device="cuda")
        out = attention_varlen(q, k, v, cu, cu, 5, 5)
        assert out.shape == q.shape and out.device == q.device


def test_meta_offsets_are_not_read():
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    assert values_unreadable(cu)
    assert check_cu_seqlens(cu, "cu_seqlens_q", 5, 3, torch.device("meta")) == 2


def test_real_cpu_values_are_readable():
    assert not values_unreadable(torch.zeros(3, dtype=torch.int32))


def test_capture_check_never_initialises_cuda():
    if torch.cuda.is_initialized():
        pytest.skip("CUDA already initialised in this process")
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.empty(3, device="cuda")
    assert not validation._capturing_cuda_graph(fake)  # no context: no capture, and none created by asking
    assert not validation._capturing_cuda_graph(torch.zeros(3))
    assert not torch.cuda.is_initialized()


def test_capture_makes_cuda_values_unreadable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.empty(3, device="cuda")
    assert validation._capturing_cuda_graph(fake)
    assert not validation._capturing_cuda_graph(torch.zeros(3))  # a CPU read needs no CUDA sync
    assert not values_unreadable(torch.zeros(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offsets_inside_cuda_graph_capture():
    """A cu_seqlens first seen during capture is not read (a sync would invalidate the capture)."""
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        assert values_unreadable(cu)
        assert check_cu_seqlens(cu, "cu_seqlens_q", 5, 3, cu.device) == 2
    assert not values_unreadable(cu)


# --- attention_with_kvcache: devices, and no read of unreadable cache_seqlens ---------------------------------------

def _kv(device="cpu", B=2, S=10):
    q = torch.randn(B, 2, 1, 16, device=device)
    return q, torch.randn(B, 2, S, 16, device=device), torch.randn(B, 2, S, 16, device=device)


def _kv_args(q, kc, vc, seqlens, k_new=None, v_new=None, block_table=None):
    return q, kc, vc, seqlens, k_new, v_new, block_table, 1, True


def test_kvcache_cache_seqlens_on_another_device():
    q, kc, vc = _kv()
    seqlens = torch.zeros(2, dtype=torch.int32, device="meta")
    with pytest.raises(InputError, match="cache_seqlens must be on q's device"):
        check_kvcache(*_kv_args(q, kc, vc, seqlens))
    before = sum(ops.launch_counts.values())
    with pytest.raises(InputError, match="cache_seqlens must be on q's device"):
        attention_with_kvcache(q, kc, vc, seqlens)
    assert sum(ops.launch_counts.values()) == before


def test_kvcache_block_table_on_another_device():
    q, _, _ = _kv()
    pages = torch.randn(4, 2, 8, 16)
    table = torch.zeros(2, 2, dtype=torch.int32, device="meta")
    with pytest.raises(InputError, match="block_table must be on q's device"):
        check_kvcache(*_kv_args(q, pages, pages.clone(), torch.zeros(2, dtype=torch.int32), block_table=table))


@pytest.mark.parametrize("which", ["k_cache", "v_cache"])
@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_caches_on_another_device(which, paged):
    q, kc, vc = _kv()
    table = torch.zeros(2, 1, dtype=torch.int32) if paged else None
    caches = {"k_cache": kc, "v_cache": vc}
    caches[which] = caches[which].to("meta")
    with pytest.raises(InputError, match="one device"):
        check_kvcache(*_kv_args(q, caches["k_cache"], caches["v_cache"], torch.zeros(2, dtype=torch.int32),
                                block_table=table))


def test_kvcache_new_tokens_on_another_device():
    q, kc, vc = _kv()
    new = torch.randn(2, 2, 1, 16, device="meta")
    with pytest.raises(InputError, match="cache's device"):
        check_kvcache(*_kv_args(q, kc, vc, torch.zeros(2, dtype=torch.int32), new, new.clone()))
    with pytest.raises(TypeError, match="cache's dtype"):
        check_kvcache(*_kv_args(q, kc, vc, torch.zeros(2, dtype=torch.int32), torch.randn(2, 2, 1, 16).double(),
                                torch.randn(2, 2, 1, 16)))


def test_kvcache_real_cpu_seqlens_with_fake_cuda_caches():
    with FakeTensorMode(allow_non_fake_inputs=True):
        q, kc, vc = _kv("cuda")
    seqlens = torch.zeros(2, dtype=torch.int32)  # real, on the CPU: read it and you would not notice
    with pytest.raises(InputError, match="cache_seqlens must be on q's device"):
        check_kvcache(*_kv_args(q, kc, vc, seqlens))


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_fake_seqlens_are_not_read(paged):
    """Fake cache_seqlens have no values: no host read, no overflow check, the metadata checks still run."""
    with FakeTensorMode(allow_non_fake_inputs=False):
        q, kc, vc = _kv("cuda")
        seqlens = torch.tensor([3, 4], dtype=torch.int32, device="cuda")
        new = torch.randn(2, 2, 2, 16, device="cuda")
        table = torch.zeros(2, 3, dtype=torch.int32, device="cuda") if paged else None
        capacity = 3 * 10 if paged else 10
        assert check_kvcache(*_kv_args(q, kc, vc, seqlens, new, new.clone(), table)) == (capacity, 2, False)
        with pytest.raises(InputError, match="int32 tensor of shape"):
            check_kvcache(*_kv_args(q, kc, vc, seqlens.long()))


def test_kvcache_overflow_still_refused_when_readable():
    q, kc, vc = _kv()
    with pytest.raises(InputError, match="does not fit"):
        check_kvcache(*_kv_args(q, kc, vc, torch.tensor([3, 10], dtype=torch.int32), *(torch.randn(2, 2, 1, 16),) * 2))
