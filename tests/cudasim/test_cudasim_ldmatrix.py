"""ldmatrix (inline PTX) on cudasim: each lane's registers hold the PTX ISA's fragment of four 8x8 b16 matrices
(lane L: row L / 4, columns 2 (L % 4) and + 1, the lower half first), plain and transposed."""

import numpy as np
import pytest

import cudasim as cp

SOURCE = r"""
extern "C" __global__ void load4(const unsigned short* m, unsigned* out, int trans) {
    __shared__ __align__(16) unsigned short tiles[4 * 8 * 8];  // four 8x8 matrices, row-major
    for (int i = threadIdx.x; i < 4 * 64; i += 32) tiles[i] = m[i];
    __syncwarp();
    const int lane = threadIdx.x;
    const unsigned address = __cvta_generic_to_shared(&tiles[(lane / 8) * 64 + (lane % 8) * 8]);
    unsigned r0, r1, r2, r3;
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(address));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(address));
    out[lane * 4 + 0] = r0; out[lane * 4 + 1] = r1; out[lane * 4 + 2] = r2; out[lane * 4 + 3] = r3;
}
"""


@pytest.mark.parametrize("trans", [0, 1])
def test_ldmatrix_x4_fragments(rng, trans):
    m = rng.integers(0, 2**16, size=(4, 8, 8), dtype=np.uint16)
    out = cp.empty(32 * 4, cp.uint32)
    cp.RawModule(code=SOURCE).get_function("load4")((1,), (32,), (cp.asarray(m), out, np.int32(trans)))
    mats = m.transpose(0, 2, 1) if trans else m
    lane = np.arange(32)
    want = np.stack([mats[j][lane // 4, 2 * (lane % 4)].astype(np.uint32)
                     | (mats[j][lane // 4, 2 * (lane % 4) + 1].astype(np.uint32) << 16) for j in range(4)], axis=1)
    np.testing.assert_array_equal(out.get().reshape(32, 4), want)
