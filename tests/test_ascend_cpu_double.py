"""The CPU test double of the Ascend C API (tests/ascend_cpu): each test compiles a small C++
library against the headers with the flags emitted kernels get, runs it through ctypes and checks
what the double computed or which rule it enforced (see tests/ascend_cpu/API.md)."""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

HEADERS = Path(__file__).parent / "ascend_cpu"
FLAGS = ["-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", "-DASCENDC_CPU_DEBUG"]

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

# Shared by the single-file programs: `body()` reports `key=value` lines through put(); thrown()
# records the exception type and message of a call that must fail (or "NO THROW").
PRELUDE = r"""
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>
#include "kernel_operator.h"
#include "lib/matmul_intf.h"
#include "tiling/tiling_api.h"
using namespace AscendC;

inline std::string report;
inline void put(const std::string& key, const std::string& value) { report += key + "=" + value + "\n"; }
inline std::string fmt(double v) { char b[64]; std::snprintf(b, sizeof b, "%.17g", v); return b; }
template <class T> inline void putv(const std::string& key, const std::vector<T>& v) {
    std::string s;
    for (const T& x : v) s += (s.empty() ? "" : ",") + fmt(static_cast<float>(x));
    put(key, s);
}
template <class T> inline void putt(const std::string& key, const LocalTensor<T>& t, uint32_t n) {
    std::vector<T> v;
    for (uint32_t i = 0; i < n; ++i) v.push_back(t.GetValue(i));
    putv(key, v);
}
template <class F> inline void thrown(const std::string& key, F f) {
    try {
        f();
        put(key, "NO THROW");
    } catch (const std::out_of_range& e) {
        put(key, std::string("out_of_range: ") + e.what());
    } catch (const std::logic_error& e) {
        put(key, std::string("logic_error: ") + e.what());
    }
}
void body();
extern "C" const char* run() {
    report.clear();
    try { body(); } catch (const std::exception& e) { put("UNCAUGHT", e.what()); }
    return report.c_str();
}
"""


def compile_lib(tmp_path: Path, sources: dict[str, str], name: str = "lib") -> ctypes.CDLL:
    """Compiles `sources` (file name -> text) into one shared library, exactly as emitted kernels are."""
    paths = []
    for file, text in sources.items():
        paths.append(tmp_path / file)
        paths[-1].write_text(text)
    lib = tmp_path / f"{name}.so"
    proc = subprocess.run(["g++", *FLAGS, "-I", str(HEADERS), *map(str, paths), "-o", str(lib)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(lib))


def run_body(tmp_path: Path, body: str) -> dict[str, str]:
    lib = compile_lib(tmp_path, {"prog.cpp": PRELUDE + body})
    lib.run.restype = ctypes.c_char_p
    result = dict(line.split("=", 1) for line in lib.run().decode().splitlines())
    assert "UNCAUGHT" not in result, result["UNCAUGHT"]
    return result


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def same(actual: list[float], expected: list[float], rel: float = 0.0) -> bool:
    """Equal element-wise (NaN matches NaN), within `rel` relative error."""
    assert len(actual) == len(expected), (actual, expected)
    return all((math.isnan(a) and math.isnan(e)) or a == e or abs(a - e) <= rel * abs(e)
               for a, e in zip(actual, expected))


def raised(result: dict[str, str], key: str, kind: str, *parts: str) -> None:
    """`key` threw `kind` ("out_of_range" or "logic_error") with every one of `parts` in its message."""
    text = result[key]
    assert text.startswith(kind + ": "), f"{key}: {text}"
    for part in parts:
        assert part in text, f"{key}: {part!r} not in {text!r}"


NAN = float("nan")


def test_data_copy_pad_strides_and_pad_fill(tmp_path):
    r = run_body(tmp_path, r"""
void body() {
    std::vector<float> src(64), dst(24, 7777.0f);
    for (int i = 0; i < 64; ++i) src[i] = float(i);
    GlobalTensor<float> gs, gd;
    gs.SetGlobalBuffer(src.data(), 64);
    gd.SetGlobalBuffer(dst.data(), 24);
    TPipe pipe;
    TBuf<TPosition::VECCALC> buf;
    pipe.InitBuffer(buf, 4096);
    LocalTensor<float> ub = buf.Get<float>();
    // 3 blocks of 5 floats, 3 floats apart in GM; UB blocks of 32 bytes with a 1-block gap.
    DataCopyPad(ub, gs, DataCopyExtParams(3, 20, 12, 1), DataCopyPadExtParams<float>(true, 0, 0, -1.0f));
    putt("pad", ub, 48);
    DataCopyPad(ub[64], gs, DataCopyExtParams(2, 20, 0, 0), DataCopyPadExtParams<float>(false, 0, 0, -1.0f));
    putt("nopad", ub[64], 16);
    // Back out: same UB layout, 2 floats (8 bytes) between GM blocks.
    DataCopyPad(gd, ub, DataCopyExtParams(3, 20, 1, 8));
    putv("gm", dst);
    // half: 3-element blocks pad to 16 elements.
    std::vector<half> hs(16);
    for (int i = 0; i < 16; ++i) hs[i] = half(i + 1);
    GlobalTensor<half> gh;
    gh.SetGlobalBuffer(hs.data(), 16);
    LocalTensor<half> hub = buf.Get<half>()[1024];
    DataCopyPad(hub, gh, DataCopyExtParams(2, 6, 2, 0), DataCopyPadExtParams<half>(true, 0, 0, half(0.5f)));
    putt("half", hub, 32);
    DataCopyPadExtParams<float> none(false, 0, 0, 0.0f);
    thrown("odd_len", [&] { DataCopyPad(ub, gs, DataCopyExtParams(1, 6, 0, 0), none); });
    thrown("misaligned", [&] { DataCopyPad(ub[4], gs, DataCopyExtParams(1, 16, 0, 0), none); });
    thrown("misaligned_out", [&] { DataCopyPad(gd, ub[4], DataCopyExtParams(1, 16, 0, 0)); });
    thrown("gm_range", [&] { DataCopyPad(ub, gs[40], DataCopyExtParams(2, 64, 0, 0), none); });
    thrown("ub_range", [&] { DataCopyPad(buf.Get<float>(16), gs, DataCopyExtParams(2, 64, 0, 0), none); });
    thrown("side_pad", [&] { DataCopyPad(ub, gs, DataCopyExtParams(1, 16, 0, 0), DataCopyPadExtParams<float>(true, 1, 0, 0.0f)); });
}
""")
    pad = []
    for i in range(3):
        pad += [float(8 * i + k) for k in range(5)] + [-1.0] * 3 + [NAN] * 8  # gap block: never written
    assert same(floats(r["pad"]), pad)
    assert same(floats(r["nopad"]), [0, 1, 2, 3, 4] + [NAN] * 3 + [5, 6, 7, 8, 9] + [NAN] * 3)  # pad bytes untouched
    gm = [7777.0] * 24
    for i in range(3):
        gm[7 * i:7 * i + 5] = [float(8 * i + k) for k in range(5)]
    assert same(floats(r["gm"]), gm)
    assert same(floats(r["half"]), [1, 2, 3] + [0.5] * 13 + [5, 6, 7] + [0.5] * 13)
    raised(r, "odd_len", "logic_error", "blockLen 6", "multiples of the 4-byte element")
    raised(r, "misaligned", "logic_error", "dst starts at UB byte 16", "not 32-byte aligned")
    raised(r, "misaligned_out", "logic_error", "src starts at UB byte 16")
    raised(r, "gm_range", "out_of_range", "GlobalTensor: elements [56, 72) out of range (size 64)")
    raised(r, "ub_range", "out_of_range", "dst bytes [64, 128) beyond the tensor's 64 bytes")
    raised(r, "side_pad", "logic_error", "leftPadding/rightPadding")


def test_pipe_queues_copies_and_poison(tmp_path):
    r = run_body(tmp_path, r"""
void body() {
    {
        TPipe p;
        TQue<QuePosition::VECIN, 2> big;
        TBuf<TPosition::VECCALC> rest, last, extra;
        TBuf<TPosition::A1> l1;
        thrown("ub_overflow", [&] { p.InitBuffer(big, 2, 100 * 1024); });
        p.InitBuffer(rest, 192 * 1024 - 32);
        p.InitBuffer(last, 32);  // exactly full
        thrown("ub_full", [&] { p.InitBuffer(extra, 32); });
        thrown("len48", [&] { p.InitBuffer(extra, 48); });
        thrown("second_pipe", [&] { TPipe other; });
        thrown("l1", [&] { p.InitBuffer(l1, 32); });
        thrown("twice", [&] { p.InitBuffer(last, 32); });
    }
    TPipe pipe;  // the first one is gone, so this is allowed
    TQue<QuePosition::VECIN, 1> q;
    TQue<QuePosition::VECOUT, 1> r;
    TBuf<TPosition::VECCALC> buf;
    pipe.InitBuffer(q, 2, 256);
    pipe.InitBuffer(r, 2, 64);
    pipe.InitBuffer(buf, 1024);

    std::vector<uint8_t> bytes(64, 1);
    GlobalTensor<uint8_t> gb;
    gb.SetGlobalBuffer(bytes.data(), 64);
    LocalTensor<uint8_t> ubb = buf.Get<uint8_t>();
    thrown("copy31", [&] { DataCopy(ubb, gb, 31); });
    thrown("copy_misaligned", [&] { DataCopy(ubb[16], gb, 32); });
    DataCopy(ubb[32], gb, 32);
    put("copy", std::to_string(int(ubb.GetValue(31))) + "," + std::to_string(int(ubb.GetValue(32))) + "," +
                    std::to_string(int(ubb.GetValue(63))));

    // Never-written UB reads as 0xFF bytes.
    float f = buf.Get<float>()[64].GetValue(0);
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    put("poison_bits", std::to_string(bits));
    put("poison_half", fmt(static_cast<float>(buf.Get<half>()[384].GetValue(3))));
    LocalTensor<float> ones = buf.Get<float>()[128];
    Duplicate(ones, 1.0f, 8);
    Add(ones, ones, buf.Get<float>()[64], 8);
    putt("poisoned_add", ones, 2);

    auto a = q.AllocTensor<float>();
    a.SetValue(0, 1.0f);
    auto b = q.AllocTensor<float>();
    thrown("alloc3", [&] { q.AllocTensor<float>(); });
    thrown("deque_empty", [&] { q.DeQue<float>(); });
    q.EnQue(a);
    thrown("depth", [&] { q.EnQue(b); });
    thrown("free_enqueued", [&] { q.FreeTensor(a); });
    auto a2 = q.DeQue<float>();
    put("dequeued", fmt(a2.GetValue(0)));
    q.FreeTensor(a2);
    q.FreeTensor(b);
    thrown("double_free", [&] { q.FreeTensor(b); });
    LocalTensor<float> foreign = buf.Get<float>();
    thrown("foreign_free", [&] { q.FreeTensor(foreign); });
    thrown("foreign_enque", [&] { q.EnQue(foreign); });

    // Two buffers rotate: the second allocation gets the other (fresh) buffer.
    auto x = r.AllocTensor<float>();
    x.SetValue(0, 5.0f);
    r.FreeTensor(x);
    auto y = r.AllocTensor<float>();
    const float yv = y.GetValue(0);
    r.FreeTensor(y);
    auto z = r.AllocTensor<float>();
    put("rotation", fmt(yv) + "," + fmt(z.GetValue(0)) + "," + std::to_string(z.GetSize()));

    std::vector<float> g(128, 0.0f);
    GlobalTensor<float> gt, unset;
    gt.SetGlobalBuffer(g.data(), 128);
    thrown("gm_get", [&] { gt.GetValue(130); });
    thrown("gm_view", [&] { gt[100].SetValue(30, 1.0f); });
    thrown("gm_copy", [&] { DataCopy(buf.Get<float>(), gt[120], 16); });
    thrown("gm_unset", [&] { unset.GetValue(0); });
    thrown("local_get", [&] { buf.Get<float>(64).GetValue(64); });
    thrown("local_view", [&] { buf.Get<float>(64)[65]; });
    thrown("tbuf_get", [&] { buf.Get<float>(257); });
    thrown("unallocated", [&] { LocalTensor<float>().GetValue(0); });
    put("reinterpret", std::to_string(buf.Get<float>(64).ReinterpretCast<half>().GetSize()));
}
""")
    raised(r, "ub_overflow", "logic_error", "2 x 102400 bytes", "196608")
    raised(r, "ub_full", "logic_error", "on top of 196608 already used")
    raised(r, "len48", "logic_error", "len 48 bytes is not a positive multiple of 32")
    raised(r, "second_pipe", "logic_error", "second TPipe")
    raised(r, "l1", "logic_error", "position A1")
    raised(r, "twice", "logic_error", "already has a buffer")
    raised(r, "copy31", "logic_error", "31 bytes is not a multiple of 32")
    raised(r, "copy_misaligned", "logic_error", "dst starts at UB byte", "not 32-byte aligned")
    assert r["copy"] == "255,1,1"
    assert r["poison_bits"] == str(0xFFFFFFFF)
    assert math.isnan(float(r["poison_half"]))
    assert all(math.isnan(v) for v in floats(r["poisoned_add"]))
    raised(r, "alloc3", "logic_error", "all 2 buffers are already allocated")
    raised(r, "deque_empty", "logic_error", "queue is empty")
    raised(r, "depth", "logic_error", "depth 1 is full")
    raised(r, "free_enqueued", "logic_error", "still enqueued")
    assert r["dequeued"] == "1"
    raised(r, "double_free", "logic_error", "FreeTensor: tensor was not allocated from this queue")
    raised(r, "foreign_free", "logic_error", "not allocated from this queue")
    raised(r, "foreign_enque", "logic_error", "EnQue: tensor was not allocated from this queue")
    yv, zv, size = floats(r["rotation"])
    assert math.isnan(yv) and zv == 5.0 and size == 16
    raised(r, "gm_get", "out_of_range", "GlobalTensor: element 130 out of range (size 128)")
    raised(r, "gm_view", "out_of_range", "GlobalTensor: element 130 out of range (size 128)")
    raised(r, "gm_copy", "out_of_range", "elements [120, 136) out of range (size 128)")
    raised(r, "gm_unset", "logic_error", "before SetGlobalBuffer")
    raised(r, "local_get", "out_of_range", "element 64 out of range (size 64)")
    raised(r, "local_view", "out_of_range", "offset 65 beyond the tensor's 64 elements")
    raised(r, "tbuf_get", "out_of_range", "257 elements (1028 bytes) exceed the buffer's 1024 bytes")
    raised(r, "unallocated", "logic_error", "never allocated")
    assert r["reinterpret"] == "128"


def test_cast_rounding_modes(tmp_path):
    r = run_body(tmp_path, r"""
const char* const kModes[] = {"RINT", "FLOOR", "CEIL", "TRUNC", "ROUND", "ODD"};
const RoundMode kMode[] = {RoundMode::CAST_RINT, RoundMode::CAST_FLOOR, RoundMode::CAST_CEIL,
                           RoundMode::CAST_TRUNC, RoundMode::CAST_ROUND, RoundMode::CAST_ODD};

template <class N> void narrow(const char* name, const float (&in)[8], const LocalTensor<float>& f,
                               const LocalTensor<N>& n, const LocalTensor<float>& back) {
    for (int i = 0; i < 8; ++i) f.SetValue(i, in[i]);
    for (int m = 0; m < 6; ++m) {
        Cast(n, f, kMode[m], 8);
        Cast(back, n, RoundMode::CAST_NONE, 8);
        putt(std::string(name) + "_" + kModes[m], back, 8);
    }
}

void body() {
    TPipe pipe;
    TBuf<TPosition::VECCALC> buf;
    pipe.InitBuffer(buf, 4096);
    LocalTensor<float> f = buf.Get<float>(16), back = buf.Get<float>()[128];
    LocalTensor<half> h = buf.Get<half>()[64];
    LocalTensor<bfloat16_t> b = buf.Get<bfloat16_t>()[128];
    LocalTensor<int32_t> ints = buf.Get<int32_t>()[256];
    const float hin[8] = {1 + 0x1p-11f, 1 + 3 * 0x1p-11f, 1 + 0x1p-12f, -(1 + 0x1p-12f), 70000.0f, 2.5f, -1.5f, NAN};
    const float bin[8] = {1 + 0x1p-8f, 1 + 3 * 0x1p-8f, 1 + 0x1p-9f, -(1 + 0x1p-9f), 3.4e38f, 2.5f, -1.5f, NAN};
    narrow("half", hin, f, h, back);
    narrow("bf16", bin, f, b, back);

    const float iin[8] = {2.5f, -1.5f, 3.7f, -3.7f, 1e10f, -1e10f, NAN, 0.0f};
    for (int i = 0; i < 8; ++i) f.SetValue(i, iin[i]);
    for (int m = 0; m < 5; ++m) {
        Cast(ints, f, kMode[m], 8);
        std::string s;
        for (int i = 0; i < 8; ++i) s += (i ? "," : "") + std::to_string(ints.GetValue(i));
        put(std::string("int_") + kModes[m], s);
    }
    ints.SetValue(0, 16777217);
    ints.SetValue(1, -16777217);
    for (int m = 0; m < 3; ++m) {
        Cast(back, ints, kMode[m], 2);
        putt(std::string("i2f_") + kModes[m], back, 2);
    }
    thrown("widen_mode", [&] { Cast(back, h, RoundMode::CAST_RINT, 8); });
    thrown("int_none", [&] { Cast(ints, f, RoundMode::CAST_NONE, 8); });
    thrown("overlap", [&] { Cast(f.ReinterpretCast<half>(), f, RoundMode::CAST_RINT, 8); });

    uint32_t nan_bits = 0x7f800001u;  // a NaN whose payload sits below bfloat16's 7 mantissa bits
    float nan_f;
    std::memcpy(&nan_f, &nan_bits, 4);
    put("bf16_bits", std::to_string(bfloat16_t(1 + 0x1p-8f).bits) + "," + std::to_string(bfloat16_t(1 + 3 * 0x1p-8f).bits) +
                         "," + std::to_string(bfloat16_t(nan_f).bits) + "," + fmt(float(bfloat16_t(nan_f))));
}
""")
    for name, ulp, big, top in (("half", 2.0**-10, 65504.0, 70000.0), ("bf16", 2.0**-7, float.fromhex("0x1.fep127"), 3.4e38)):
        assert big < top
        lo1, hi1 = 1.0, 1 + ulp          # inputs 0 (tie, even below) and 2 (nearer below)
        lo2, hi2 = 1 + ulp, 1 + 2 * ulp  # input 1: tie, even above
        inf = math.inf
        expected = {
            "RINT": [lo1, hi2, lo1, -lo1, inf],
            "FLOOR": [lo1, lo2, lo1, -hi1, big],
            "CEIL": [hi1, hi2, hi1, -lo1, inf],
            "TRUNC": [lo1, lo2, lo1, -lo1, big],
            "ROUND": [hi1, hi2, lo1, -lo1, inf],
            "ODD": [hi1, lo2, hi1, -hi1, big],
        }
        for mode, values in expected.items():
            assert same(floats(r[f"{name}_{mode}"]), values + [2.5, -1.5, NAN]), (name, mode)
    imax, imin = 2**31 - 1, -(2**31)
    assert r["int_RINT"] == f"2,-2,4,-4,{imax},{imin},0,0"
    assert r["int_FLOOR"] == f"2,-2,3,-4,{imax},{imin},0,0"
    assert r["int_CEIL"] == f"3,-1,4,-3,{imax},{imin},0,0"
    assert r["int_TRUNC"] == f"2,-1,3,-3,{imax},{imin},0,0"
    assert r["int_ROUND"] == f"3,-2,4,-4,{imax},{imin},0,0"
    assert floats(r["i2f_RINT"]) == [16777216.0, -16777216.0]
    assert floats(r["i2f_FLOOR"]) == [16777216.0, -16777218.0]
    assert floats(r["i2f_CEIL"]) == [16777218.0, -16777216.0]
    raised(r, "widen_mode", "logic_error", "half->float is exact; use CAST_NONE")
    raised(r, "int_none", "logic_error", "float->int32_t needs CAST_RINT")
    raised(r, "overlap", "logic_error", "dst overlaps src")
    tie, tie_up, nan_bits, nan_value = r["bf16_bits"].split(",")
    assert (int(tie), int(tie_up), int(nan_bits)) == (0x3F80, 0x3F82, 0x7FC0) and math.isnan(float(nan_value))


def test_vector_math_and_reductions(tmp_path):
    r = run_body(tmp_path, r"""
void body() {
    TPipe pipe;
    TBuf<TPosition::VECCALC> buf;
    pipe.InitBuffer(buf, 8192);
    LocalTensor<float> x = buf.Get<float>(64), p = buf.Get<float>()[64], y = buf.Get<float>()[128],
                       z = buf.Get<float>()[192], w = buf.Get<float>()[256];
    const float xs[8] = {-2.0f, -0.5f, 0.0f, 0.25f, 1.0f, 1.5f, 3.0f, -0.0f};
    const float ps[8] = {0.25f, 1.0f, 2.0f, 9.0f, 0.1f, 100.0f, 7.0f, 1e-3f};
    for (int i = 0; i < 8; ++i) x.SetValue(i, xs[i]), p.SetValue(i, ps[i]);
    Exp(y, x, 8); putt("Exp", y, 8);
    Tanh(y, x, 8u); putt("Tanh", y, 8);
    Erf(y, x, 8u); putt("Erf", y, 8);
    Abs(y, x, 8); putt("Abs", y, 8);
    Relu(y, x, 8); putt("Relu", y, 8);
    Ln(y, p, 8); putt("Ln", y, 8);
    Sqrt(y, p, 8); putt("Sqrt", y, 8);
    Reciprocal(y, p, 8); putt("Reciprocal", y, 8);
    Add(y, x, p, 8); putt("Add", y, 8);
    Sub(y, x, p, 8); putt("Sub", y, 8);
    Mul(y, x, p, 8); putt("Mul", y, 8);
    Div(y, x, p, 8); putt("Div", y, 8);
    Max(y, x, p, 8); putt("Max", y, 8);
    Min(y, x, p, 8); putt("Min", y, 8);
    Adds(y, x, 1.5f, 8); putt("Adds", y, 8);
    Muls(y, x, 1.5f, 8); putt("Muls", y, 8);
    Maxs(y, x, 0.1f, 8); putt("Maxs", y, 8);
    Mins(y, x, 0.1f, 8); putt("Mins", y, 8);
    Duplicate(y, 4.0f, 8);
    Add(y, y, x, 8);  // dst aliasing src0 exactly is allowed
    putt("alias", y, 8);

    ReduceMax(z, x, w, 8, true);
    put("max", fmt(z.GetValue(0)) + "," + std::to_string(z.ReinterpretCast<uint32_t>().GetValue(1)));
    ReduceSum(z, p, w, 8);
    put("sum", fmt(z.GetValue(0)) + "," + fmt(w.GetValue(0)));  // workLocal is scratch afterwards
    x.SetValue(3, NAN);
    ReduceMax(z, x, w, 8);
    put("max_nan", fmt(z.GetValue(0)));
    Max(y, x, p, 8);
    put("max_nan_elem", fmt(y.GetValue(3)));

    // half rounds each op's float result back to half.
    LocalTensor<half> hx = buf.Get<half>()[1024], hy = buf.Get<half>()[1088], hw = buf.Get<half>()[1152];
    for (int i = 0; i < 8; ++i) hx.SetValue(i, half(xs[i]));
    Exp(hy, hx, 8); putt("half_Exp", hy, 8);
    Muls(hy, hx, half(0.1f), 8); putt("half_Muls", hy, 8);
    ReduceSum(hy, hx, hw, 8); putt("half_sum", hy, 1);

    thrown("misaligned", [&] { Exp(y[1], x, 4); });
    thrown("too_many", [&] { Add(y, x, p, 65); });
    thrown("negative", [&] { Exp(y, x, -1); });
    thrown("partial_alias", [&] { Add(y[8], y, p, 16); });
    thrown("work_overlap", [&] { ReduceMax(z, x, x[8], 16); });
    thrown("reduce_empty", [&] { ReduceSum(z, x, w, 0); });
}
""")
    xs = [-2.0, -0.5, 0.0, 0.25, 1.0, 1.5, 3.0, -0.0]
    ps = [0.25, 1.0, 2.0, 9.0, 0.1, 100.0, 7.0, 1e-3]
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).tolist()  # noqa: E731 - inputs as the C++ floats
    xs, ps = f32(xs), f32(ps)
    unary = {"Exp": math.exp, "Tanh": math.tanh, "Erf": math.erf, "Abs": abs, "Relu": lambda v: max(v, 0.0)}
    for name, fn in unary.items():
        assert same(floats(r[name]), [fn(v) for v in xs], rel=1e-6), name
    assert floats(r["Abs"])[7] == 0.0 and str(floats(r["Abs"])[7]) == "0.0"  # |-0| has no sign
    positive = {"Ln": math.log, "Sqrt": math.sqrt, "Reciprocal": lambda v: 1 / v}
    for name, fn in positive.items():
        assert same(floats(r[name]), [fn(v) for v in ps], rel=1e-6), name
    binary = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
              "Div": lambda a, b: a / b, "Max": max, "Min": min}
    for name, fn in binary.items():
        assert same(floats(r[name]), [fn(a, b) for a, b in zip(xs, ps)], rel=1e-6), name
    scalar = {"Adds": lambda a: a + 1.5, "Muls": lambda a: a * 1.5, "Maxs": lambda a: max(a, f32(0.1)),
              "Mins": lambda a: min(a, f32(0.1))}
    for name, fn in scalar.items():
        assert same(floats(r[name]), [fn(a) for a in xs], rel=1e-6), name
    assert floats(r["alias"]) == [4 + v for v in xs]
    assert floats(r["max"]) == [3.0, 6.0]
    total, scratch = floats(r["sum"])
    assert total == pytest.approx(sum(ps), rel=1e-6) and math.isnan(scratch)
    assert math.isnan(float(r["max_nan"])) and math.isnan(float(r["max_nan_elem"]))
    halves = torch.tensor(xs, dtype=torch.float16)
    expected_exp = torch.exp(halves.float()).half().float().tolist()
    assert floats(r["half_Exp"]) == expected_exp
    tenth = torch.tensor(0.1, dtype=torch.float16).float()
    assert floats(r["half_Muls"]) == (halves.float() * tenth).half().float().tolist()
    assert floats(r["half_sum"]) == [halves.float().sum().half().item()]
    raised(r, "misaligned", "logic_error", "Exp: dst starts at UB byte 516, not 32-byte aligned")
    raised(r, "too_many", "out_of_range", "Add: count 65 exceeds src0's 64 elements")
    raised(r, "negative", "logic_error", "negative count -1")
    raised(r, "partial_alias", "logic_error", "dst partially overlaps src0")
    raised(r, "work_overlap", "logic_error", "workLocal overlaps src")
    raised(r, "reduce_empty", "logic_error", "count 0 must be positive")


def test_matmul_strides_and_tiling(tmp_path):
    r = run_body(tmp_path, r"""
using namespace matmul;
namespace mt = matmul_tiling;
using AH = MatmulType<TPosition::GM, CubeFormat::ND, half>;
using BHT = MatmulType<TPosition::GM, CubeFormat::ND, half, true>;
using AFT = MatmulType<TPosition::GM, CubeFormat::ND, float, true>;
using BF = MatmulType<TPosition::GM, CubeFormat::ND, float>;
using CF = MatmulType<TPosition::VECCALC, CubeFormat::ND, float>;

int64_t tile(mt::DataType t, int bm, int bn, int bk, TCubeTiling& tiling, bool split = true) {
    mt::MatmulApiTiling api;
    api.SetAType(mt::TPosition::GM, mt::CubeFormat::ND, t);
    api.SetBType(mt::TPosition::GM, mt::CubeFormat::ND, t, true);
    api.SetCType(mt::TPosition::VECCALC, mt::CubeFormat::ND, mt::DataType::DT_FLOAT);
    api.SetBiasType(mt::TPosition::GM, mt::CubeFormat::ND, mt::DataType::DT_FLOAT);
    api.SetShape(3, 4, 5);
    api.SetOrgShape(3, 4, 5);
    api.SetBias(false);
    if (split) api.SetFixSplit(bm, bn, bk);
    api.SetBufferSpace(-1, -1, -1);
    return api.GetTiling(tiling);
}

void body() {
    TCubeTiling t{}, scratch{};
    const int64_t rc = tile(mt::DataType::DT_FLOAT16, 16, 16, 16, t);
    put("tiling", std::to_string(rc) + "," + std::to_string(t.M) + "," + std::to_string(t.N) + "," + std::to_string(t.Ka) +
                      "," + std::to_string(t.singleCoreK) + "," + std::to_string(t.baseN) + "," + std::to_string(t.usedCoreNum));
    put("oversize", std::to_string(tile(mt::DataType::DT_FLOAT16, 256, 128, 256, scratch)) + "," +
                        std::to_string(tile(mt::DataType::DT_FLOAT, 128, 128, 128, scratch)) + "," +
                        std::to_string(tile(mt::DataType::DT_FLOAT, 256, 129, 16, scratch)) + "," +
                        std::to_string(tile(mt::DataType::DT_FLOAT16, 0, 0, 0, scratch, false)));

    // A 3x5 (row stride 5), B given transposed as 4 rows of orgKb = 7 (only k < 5 used).
    std::vector<half> a(15), bt(28);
    for (int i = 0; i < 15; ++i) a[i] = half(i % 7 - 3);
    for (int i = 0; i < 28; ++i) bt[i] = half(i % 5 - 2);
    GlobalTensor<half> ga, gbt, gshort;
    ga.SetGlobalBuffer(a.data(), 15);
    gbt.SetGlobalBuffer(bt.data(), 28);
    gshort.SetGlobalBuffer(bt.data(), 20);
    std::vector<uint8_t> sysWorkspace(64);
    SetSysWorkspace(sysWorkspace.data());
    TPipe pipe;
    Matmul<AH, BHT, CF> mm;
    Matmul<AFT, BF, CF> mm2;
    REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &t, mm2, &t);  // one call, before InitBuffer
    TQue<QuePosition::VECOUT, 1> cq;
    pipe.InitBuffer(cq, 1, 16 * 16 * 4);
    mm.SetOrgShape(3, 4, 5, 7);
    mm.SetTensorA(ga);
    mm.SetTensorB(gbt, true);
    LocalTensor<float> c = cq.AllocTensor<float>();
    int iters = 0;
    while (mm.Iterate()) {
        mm.GetTensorC(c);
        ++iters;
    }
    put("iters", std::to_string(iters));
    putt("ub", c, 256);
    thrown("after_false", [&] { mm.GetTensorC(c); });
    // CANN: GetTensorC's UB tensor must hold baseM * baseN elements, even for a 3 x 4 single shape.
    TQue<QuePosition::VECOUT, 1> smallq;
    pipe.InitBuffer(smallq, 1, 15 * 16 * 4);
    LocalTensor<float> small = smallq.AllocTensor<float>();
    mm.Iterate();
    thrown("small_c", [&] { mm.GetTensorC(small); });
    mm.SetTensorB(gshort, true);
    thrown("b_range", [&] { mm.Iterate(); });
    mm.SetSingleShape(17, 4, 5);
    thrown("too_big", [&] { mm.Iterate(); });
    mm.End();
    thrown("after_end", [&] { mm.Iterate(); });

    // B 5x6 (row stride orgN = 6, 4 columns used), C rows of orgKc = 9, bias.
    std::vector<float> af(15), b(30), bias{0.5f, 1.5f, 2.5f, 3.5f}, out(27, -7.0f);
    for (int i = 0; i < 15; ++i) af[i] = float(i % 4) - 1.5f;
    for (int i = 0; i < 30; ++i) b[i] = float(i % 3) + 0.25f;
    GlobalTensor<float> gaf, gb, gbias, gc;
    gaf.SetGlobalBuffer(af.data(), 15);
    gb.SetGlobalBuffer(b.data(), 30);
    gbias.SetGlobalBuffer(bias.data(), 4);
    gc.SetGlobalBuffer(out.data(), 27);
    mm2.SetOrgShape(3, 6, 5, 5, 9);
    mm2.SetSingleShape(3, 4, 5);
    mm2.SetTensorA(gaf, true);  // A given transposed: 5 rows of orgM = 3
    mm2.SetTensorB(gb);
    mm2.SetBias(gbias);
    mm2.IterateAll(gc);
    putv("gm", out);
    mm2.DisableBias();
    mm2.IterateAll(gc, 1);  // atomic add of A*B onto the previous result
    putv("gm_add", out);
    thrown("b_trans", [&] { mm2.SetTensorB(gb, true); });

    Matmul<AH, BHT, CF> fresh;
    thrown("no_init", [&] { fresh.SetSingleShape(3, 4, 5); });
    fresh.Init(&t);
    thrown("no_tensors", [&] { fresh.Iterate(); });
}
""")
    assert r["tiling"] == "0,3,4,5,5,16,1"
    assert r["oversize"] == "-1,0,-1,-1"
    assert r["iters"] == "1"
    a = [[float(i % 7 - 3) for i in range(15)][5 * m:5 * m + 5] for m in range(3)]
    bt = [float(i % 5 - 2) for i in range(28)]
    ub = floats(r["ub"])
    for i in range(16):
        for j in range(16):
            if i < 3 and j < 4:
                assert ub[16 * i + j] == sum(a[i][k] * bt[7 * j + k] for k in range(5)), (i, j)
            else:
                assert math.isnan(ub[16 * i + j]), (i, j)  # untouched poison
    raised(r, "after_false", "logic_error", "GetTensorC: no result")
    raised(r, "small_c", "out_of_range", "Matmul::GetTensorC: count 256 exceeds ub's 240 elements")
    raised(r, "b_range", "out_of_range", "Matmul::Iterate: GlobalTensor: element 21 out of range (size 20)")
    raised(r, "too_big", "logic_error", "single shape 17x4 exceeds the base block 16x16")
    raised(r, "after_end", "logic_error", "not initialised")
    af = [float(i % 4) - 1.5 for i in range(15)]  # A^T: element (i, k) at k * 3 + i
    b = [float(i % 3) + 0.25 for i in range(30)]
    bias = [0.5, 1.5, 2.5, 3.5]
    prod = [[sum(af[3 * k + i] * b[6 * k + j] for k in range(5)) for j in range(4)] for i in range(3)]
    gm, gm_add = [-7.0] * 27, [-7.0] * 27
    for i in range(3):
        for j in range(4):
            gm[9 * i + j] = prod[i][j] + bias[j]
            gm_add[9 * i + j] = gm[9 * i + j] + prod[i][j]
    assert same(floats(r["gm"]), gm, rel=1e-6)
    assert same(floats(r["gm_add"]), gm_add, rel=1e-6)
    raised(r, "b_trans", "logic_error", "isTransposeB needs MatmulType<..., ISTRANS = true>")
    raised(r, "no_init", "logic_error", "Matmul::SetSingleShape: not initialised")
    raised(r, "no_tensors", "logic_error", "SetTensorA and SetTensorB must come first")


def test_regist_matmul_obj_forms_and_rules(tmp_path):
    # CANN's REGIST_MATMUL_OBJ(tpipe, workspace, ...): one object with or without its tiling, or
    # up to 4 object/tiling pairs in ONE call per pipe, before InitBuffer, with the system
    # workspace set (SetSysWorkspace) unless the framework sets it.
    r = run_body(tmp_path, r"""
using namespace matmul;
using AF = MatmulType<TPosition::GM, CubeFormat::ND, float>;
using CF = MatmulType<TPosition::VECCALC, CubeFormat::ND, float>;
using MM = Matmul<AF, AF, CF>;

void body() {
    TCubeTiling t{};
    t.M = t.N = t.Ka = t.Kb = t.singleCoreM = t.singleCoreN = t.singleCoreK = 2;
    t.baseM = t.baseN = t.baseK = 16;
    std::vector<float> a{1, 2, 3, 4}, out(4, 0.0f);
    GlobalTensor<float> ga, gc;
    ga.SetGlobalBuffer(a.data(), 4);
    gc.SetGlobalBuffer(out.data(), 4);
    std::vector<uint8_t> ws(64);
    auto use = [&](MM& mm) {
        mm.SetTensorA(ga);
        mm.SetTensorB(ga);
        mm.IterateAll(gc);
        return fmt(out[0]) + "," + fmt(out[3]);
    };
    SetSysWorkspace(nullptr);  // as a kernel that never set it sees it (a launch clears it per block)
    {
        TPipe pipe;
        MM mm;
        thrown("null_workspace", [&] { REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &t); });
    }
    SetSysWorkspace(ws.data());
    {
        TPipe pipe;
        MM mm;
        REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm);  // no tiling: Init follows
        mm.Init(&t);
        put("one_no_tiling", use(mm));
    }
    {
        TPipe pipe;
        MM m1, m2, m3, m4;
        REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), m1, &t, m2, &t, m3, &t, m4, &t);
        put("four_pairs", use(m4));
        MM late;
        thrown("second_call", [&] { REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), late, &t); });
    }
    {
        TPipe pipe;
        TBuf<TPosition::VECCALC> buf;
        pipe.InitBuffer(buf, 32);
        MM mm;
        thrown("after_init_buffer", [&] { REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &t); });
    }
}
""")
    raised(r, "null_workspace", "logic_error", "system workspace is null", "SetSysWorkspace")
    assert r["one_no_tiling"] == "7,22"
    assert r["four_pairs"] == "7,22"
    raised(r, "second_call", "logic_error", "called twice on one TPipe", "mm1, &tiling1, mm2, &tiling2")
    raised(r, "after_init_buffer", "logic_error", "REGIST_MATMUL_OBJ after TPipe::InitBuffer")


KERNEL = r"""
#include "kernel_operator.h"
#include "lib/matmul_intf.h"  // included, unused: must still compile warning-free
using namespace AscendC;

extern "C" __global__ __aicore__ void visit(GM_ADDR visits, GM_ADDR data, uint32_t stride) {
    TPipe pipe;  // one per block; a block that throws must release it
    TBuf<TPosition::VECCALC> buf;
    pipe.InitBuffer(buf, 32);
    GlobalTensor<int32_t> v;
    v.SetGlobalBuffer((__gm__ int32_t*)visits, 16);
    GlobalTensor<float> d;
    d.SetGlobalBuffer((__gm__ float*)data, 128);
    const int64_t i = GetBlockIdx();
    v.SetValue(i, v.GetValue(i) + 1);
    v.SetValue(8 + i, int32_t(GetBlockNum()));
    d.SetValue(i * stride + 10, 1.0f);
}
"""

HOST = r"""
#include "tikicpulib.h"
#include "tiling/tiling_api.h"
extern "C" __global__ __aicore__ void visit(GM_ADDR visits, GM_ADDR data, uint32_t stride);

extern "C" int launch(uint8_t* visits, uint8_t* data, uint32_t stride, int32_t blockDim) {
    AscendC::SetKernelMode(AscendC::KernelMode::AIV_MODE);
    ICPU_RUN_KF(visit, blockDim, visits, data, stride);
    return AscendC::GetBlockIdx() == 0 && AscendC::GetBlockNum() == 1;  // reset after the launch
}

extern "C" int gm_alloc() {
    auto* p = static_cast<uint8_t*>(AscendC::GmAlloc(100));
    const int poisoned = p[0] == 0xFF && p[99] == 0xFF;
    AscendC::GmFree(p);
    return poisoned;
}
"""


def test_launch_runs_each_block_and_reports_errors(tmp_path):
    lib = compile_lib(tmp_path, {"kernel.cpp": KERNEL, "host.cpp": HOST})
    lib.tileflow_cpu_double_last_error.restype = ctypes.c_char_p
    last_error = lambda: lib.tileflow_cpu_double_last_error().decode()  # noqa: E731

    def launch(stride: int, block_dim: int) -> list[int]:
        visits, data = (ctypes.c_int32 * 16)(), (ctypes.c_float * 128)()
        assert lib.launch(visits, data, stride, block_dim) == 1
        return list(visits)

    assert launch(10, 4) == [1] * 4 + [0] * 4 + [4] * 4 + [0] * 4
    assert last_error() == ""
    # Block 3 writes element 3 * 40 + 10 = 130 of 128: blocks 0..3 ran (3 up to the failing write), 4..7 never.
    assert launch(40, 8) == [1] * 4 + [0] * 4 + [8] * 4 + [0] * 4
    assert last_error() == "block 3: SetValue: GlobalTensor: element 130 out of range (size 128)"
    assert launch(10, 2) == [1] * 2 + [0] * 6 + [2] * 2 + [0] * 6  # the throwing block released its TPipe
    assert last_error() == ""
    launch(10, 0)
    assert last_error() == "ICPU_RUN_KF: blockDim 0 must be positive"
    assert lib.gm_alloc() == 1
