// CPU test double of the Ascend C core API subset that tileflow emits (see API.md).
// It models documented semantics (what each call reads and writes, alignment and capacity rules),
// not CANN internals or timing. Every rule the hardware enforces throws std::logic_error (or
// std::out_of_range for index errors) with a message saying what was wrong.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// Address-space and core qualifiers mean nothing on the CPU. (`__inline__` is GCC's own spelling
// of `inline`, so it is left alone.)
#define __global__
#define __aicore__
#define __gm__
#define GM_ADDR __gm__ uint8_t*

using half = _Float16;  // IEEE binary16; conversions from float round to nearest-even

// bfloat16: the top 16 bits of a float. Arithmetic goes through float.
struct bfloat16_t {
    uint16_t bits;
    bfloat16_t() = default;
    bfloat16_t(float f) : bits(FromFloat(f)) {}
    operator float() const {
        uint32_t u = uint32_t(bits) << 16;
        float f;
        std::memcpy(&f, &u, sizeof f);
        return f;
    }
    static uint16_t FromFloat(float f) {
        uint32_t u;
        std::memcpy(&u, &f, sizeof u);
        if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // NaN stays NaN (quiet)
        u += 0x7fffu + ((u >> 16) & 1u);                                          // round to nearest-even
        return uint16_t(u >> 16);
    }
};

enum pipe_t { PIPE_S, PIPE_V, PIPE_M, PIPE_MTE1, PIPE_MTE2, PIPE_MTE3, PIPE_ALL };

namespace AscendC {

enum class TPosition { GM, A1, A2, B1, B2, C1, C2, CO1, CO2, VECIN, VECOUT, VECCALC };
using QuePosition = TPosition;

template <class T> class LocalTensor;
template <class T> class GlobalTensor;

namespace detail {
constexpr uint32_t kUbBytes = 192 * 1024;  // 910B unified buffer per AI vector core

template <class... A> std::string Msg(const A&... a) {
    std::ostringstream s;
    (s << ... << a);
    return s.str();
}
[[noreturn]] inline void Fail(const std::string& m) { throw std::logic_error(m); }
[[noreturn]] inline void FailRange(const std::string& m) { throw std::out_of_range(m); }

inline thread_local int64_t blockIdx = 0;
inline thread_local int64_t blockNum = 1;
inline thread_local bool pipeAlive = false;
// The system workspace (GM) the Matmul API needs; set by SetSysWorkspace, per block (a launch
// clears it before each block, as every kernel invocation must set it again).
inline thread_local uint8_t* sysWorkspace = nullptr;
struct MatmulRegistry;  // REGIST_MATMUL_OBJ's view of a TPipe (lib/matmul_intf.h)

inline uint64_t Ceil32(uint64_t n) { return (n + 31) / 32 * 32; }
template <class T> T Load(const uint8_t* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}
template <class T> void Store(uint8_t* p, T v) { std::memcpy(p, &v, sizeof(T)); }

// One TPipe's unified buffer. Fresh bytes are 0xFF (NaN as float/half) so reads of data never
// written poison results.
struct Arena {
    std::vector<uint8_t> bytes = std::vector<uint8_t>(kUbBytes, 0xFF);
};

template <class T> constexpr bool kFloaty =
    std::is_same_v<T, half> || std::is_same_v<T, bfloat16_t> || std::is_same_v<T, float>;
// Vector math on half/bfloat16 computes in float and rounds back per op, like the fp16 vector unit.
template <class T> using Calc = std::conditional_t<kFloaty<T>, float, T>;
template <class X> bool IsNaN(X x) {
    if constexpr (std::is_floating_point_v<X>) return std::isnan(x);
    else return false;
}

struct Access;  // the API functions' window into tensors' private state
}  // namespace detail

inline int64_t GetBlockIdx() { return detail::blockIdx; }
inline int64_t GetBlockNum() { return detail::blockNum; }

// The system workspace: a GM buffer the host allocates (GetLibApiWorkSpaceSize() bytes) and the
// kernel hands over with SetSysWorkspace before using the Matmul API (CANN's framework does it
// only for operator projects and kernels built with HAVE_WORKSPACE; the double models neither).
inline void SetSysWorkspace(GM_ADDR workspace) { detail::sysWorkspace = workspace; }
inline GM_ADDR GetSysWorkSpacePtr() { return detail::sysWorkspace; }

template <pipe_t P> inline void PipeBarrier() {}  // the CPU runs everything in program order

// ---------------------------------------------------------------------------------------------
// Tensors

template <class T> class GlobalTensor {
public:
    // bufferSize in elements; 0 leaves accesses unchecked.
    void SetGlobalBuffer(__gm__ T* buffer, uint64_t bufferSize = 0) {
        base_ = buffer;
        start_ = 0;
        size_ = bufferSize;
    }
    // A view `offset` elements later; it keeps the whole buffer's bounds, so errors name the
    // element index within the buffer given to SetGlobalBuffer.
    GlobalTensor operator[](uint64_t offset) const {
        GlobalTensor v = *this;
        v.start_ += offset;
        return v;
    }
    T GetValue(uint64_t offset) const { return *Addr(offset, 1, "GetValue"); }
    void SetValue(uint64_t offset, T value) { *Addr(offset, 1, "SetValue") = value; }
    __gm__ T* GetPhyAddr() const { return base_ + start_; }

private:
    friend struct detail::Access;
    T* Addr(uint64_t offset, uint64_t count, const char* op) const {
        if (!base_) detail::Fail(detail::Msg(op, ": GlobalTensor used before SetGlobalBuffer"));
        const uint64_t first = start_ + offset;
        if (size_ && first + count > size_) {
            if (count == 1)
                detail::FailRange(detail::Msg(op, ": GlobalTensor: element ", first, " out of range (size ", size_, ")"));
            detail::FailRange(detail::Msg(op, ": GlobalTensor: elements [", first, ", ", first + count,
                                          ") out of range (size ", size_, ")"));
        }
        return base_ + first;
    }
    T* base_ = nullptr;
    uint64_t start_ = 0;
    uint64_t size_ = 0;
};

// A view into a TPipe's UB arena: the arena (kept alive by the view), a byte offset inside it and
// the number of elements up to the end of the buffer it came from. Buffers start 32-byte aligned,
// so the arena offset decides the 32-byte alignment rules.
template <class T> class LocalTensor {
public:
    LocalTensor() = default;
    T GetValue(uint32_t i) const { return detail::Load<T>(Elem(i, "GetValue")); }
    void SetValue(uint32_t i, T v) const { detail::Store<T>(Elem(i, "SetValue"), v); }
    LocalTensor operator[](uint32_t offset) const {
        Live("operator[]");
        if (offset > size_)
            detail::FailRange(detail::Msg("LocalTensor::operator[]: offset ", offset, " beyond the tensor's ", size_, " elements"));
        LocalTensor v = *this;
        v.off_ += offset * uint32_t(sizeof(T));
        v.size_ -= offset;
        return v;
    }
    uint32_t GetSize() const { return size_; }
    template <class U> LocalTensor<U> ReinterpretCast() const {
        LocalTensor<U> u;
        u.arena_ = arena_;
        u.off_ = off_;
        u.size_ = uint32_t(uint64_t(size_) * sizeof(T) / sizeof(U));
        return u;
    }

private:
    template <class> friend class LocalTensor;
    friend struct detail::Access;
    void Live(const char* op) const {
        if (!arena_) detail::Fail(detail::Msg("LocalTensor::", op, ": tensor was never allocated from a TQue/TBuf"));
    }
    uint8_t* Elem(uint32_t i, const char* op) const {
        Live(op);
        if (i >= size_) detail::FailRange(detail::Msg("LocalTensor::", op, ": element ", i, " out of range (size ", size_, ")"));
        return arena_->bytes.data() + off_ + uint64_t(i) * sizeof(T);
    }
    std::shared_ptr<detail::Arena> arena_;
    uint32_t off_ = 0;
    uint32_t size_ = 0;
};

namespace detail {
struct Access {
    template <class T> static LocalTensor<T> Make(const std::shared_ptr<Arena>& a, uint32_t off, uint32_t bytes) {
        LocalTensor<T> t;
        t.arena_ = a;
        t.off_ = off;
        t.size_ = uint32_t(bytes / sizeof(T));
        return t;
    }
    template <class T> static const Arena* ArenaOf(const LocalTensor<T>& t) { return t.arena_.get(); }
    template <class T> static uint32_t Off(const LocalTensor<T>& t) { return t.off_; }
    // Checked pointer to the first byte of `t` for an operation touching `count` elements.
    template <class T>
    static uint8_t* Vec(const char* op, const char* name, const LocalTensor<T>& t, int64_t count) {
        t.Live(op);
        if (t.off_ % 32) Fail(Msg(op, ": ", name, " starts at UB byte ", t.off_, ", not 32-byte aligned"));
        if (count < 0) Fail(Msg(op, ": negative count ", count));
        if (uint64_t(count) > t.size_)
            FailRange(Msg(op, ": count ", count, " exceeds ", name, "'s ", t.size_, " elements"));
        return t.arena_->bytes.data() + t.off_;
    }
    // Checked pointer to UB bytes [first, first + n) of `t`.
    template <class T>
    static uint8_t* Bytes(const char* op, const char* name, const LocalTensor<T>& t, uint64_t first, uint64_t n) {
        uint8_t* p = Vec(op, name, t, 0);
        const uint64_t have = uint64_t(t.size_) * sizeof(T);
        if (first + n > have)
            FailRange(Msg(op, ": ", name, " bytes [", first, ", ", first + n, ") beyond the tensor's ", have, " bytes"));
        return p + first;
    }
    template <class T> static T* Gm(const GlobalTensor<T>& g, uint64_t offset, uint64_t count, const char* op) {
        return g.Addr(offset, count, op);
    }
    // Vector ops allow dst to alias a source exactly, never partially.
    template <class A, class B>
    static void NoPartialOverlap(const char* op, const char* name, const LocalTensor<A>& dst, const LocalTensor<B>& src,
                                 int64_t count) {
        if (dst.arena_ != src.arena_ || dst.off_ == src.off_) return;
        const uint64_t d0 = dst.off_, d1 = d0 + count * sizeof(A), s0 = src.off_, s1 = s0 + count * sizeof(B);
        if (d0 < s1 && s0 < d1) Fail(Msg(op, ": dst partially overlaps ", name, " (UB bytes ", d0, " and ", s0, ")"));
    }
    template <class A, class B> static bool Overlap(const LocalTensor<A>& a, uint64_t na, const LocalTensor<B>& b, uint64_t nb) {
        return a.arena_ == b.arena_ && a.off_ < b.off_ + nb * sizeof(B) && b.off_ < a.off_ + na * sizeof(A);
    }
};

inline const char* PositionName(TPosition p) {
    static const char* const names[] = {"GM", "A1", "A2", "B1", "B2", "C1", "C2", "CO1", "CO2", "VECIN", "VECOUT", "VECCALC"};
    return names[int(p)];
}
// The double models the UB only; L1/L0 belong to the Matmul API.
inline void CheckUbPosition(TPosition p, const char* what) {
    if (p != TPosition::VECIN && p != TPosition::VECOUT && p != TPosition::VECCALC)
        Fail(Msg("TPipe::InitBuffer: ", what, " in position ", PositionName(p),
                 "; only VECIN/VECOUT/VECCALC (the UB) are modelled"));
}
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Pipe, queues and buffers

class TPipe;

template <TPosition P, int32_t DEPTH> class TQue {
    static_assert(DEPTH >= 1, "TQue depth must be at least 1");

public:
    template <class T> LocalTensor<T> AllocTensor() {
        Ready("AllocTensor");
        const uint32_t n = uint32_t(offs_.size());
        uint32_t busy = 0;
        for (bool b : busy_) busy += b;
        if (busy == n)
            detail::Fail(detail::Msg("TQue::AllocTensor: all ", n, " buffers are already allocated (FreeTensor missing)"));
        while (busy_[next_]) next_ = (next_ + 1) % n;  // rotate through the buffers (double buffering)
        const uint32_t i = next_;
        busy_[i] = true;
        next_ = (i + 1) % n;
        return detail::Access::Make<T>(arena_, offs_[i], len_);
    }
    template <class T> void EnQue(const LocalTensor<T>& t) {
        const uint32_t i = Slot(t, "EnQue");
        for (uint32_t q : queue_)
            if (q == i) detail::Fail("TQue::EnQue: tensor is already enqueued");
        if (queue_.size() >= uint32_t(DEPTH))
            detail::Fail(detail::Msg("TQue::EnQue: queue of depth ", DEPTH, " is full (DeQue missing)"));
        queue_.push_back(i);
    }
    template <class T> LocalTensor<T> DeQue() {
        Ready("DeQue");
        if (queue_.empty()) detail::Fail("TQue::DeQue: queue is empty (no EnQue before it)");
        const uint32_t i = queue_.front();
        queue_.pop_front();
        return detail::Access::Make<T>(arena_, offs_[i], len_);
    }
    template <class T> void FreeTensor(LocalTensor<T>& t) {
        const uint32_t i = Slot(t, "FreeTensor");
        for (uint32_t q : queue_)
            if (q == i) detail::Fail("TQue::FreeTensor: tensor is still enqueued (DeQue it first)");
        busy_[i] = false;
    }

private:
    friend class TPipe;
    void Claim() const {  // before the pipe carves anything
        detail::CheckUbPosition(P, "TQue");
        if (arena_) detail::Fail("TPipe::InitBuffer: this TQue already has buffers");
    }
    void Init(const std::shared_ptr<detail::Arena>& arena, uint32_t off, uint8_t num, uint32_t len) {
        arena_ = arena;
        len_ = len;
        for (uint32_t i = 0; i < num; ++i) offs_.push_back(off + i * len);
        busy_.assign(num, false);
    }
    void Ready(const char* op) const {
        if (!arena_) detail::Fail(detail::Msg("TQue::", op, ": TQue has no buffers (TPipe::InitBuffer missing)"));
    }
    // Index of the allocated buffer that `t` is (the start of); throws otherwise.
    template <class T> uint32_t Slot(const LocalTensor<T>& t, const char* op) const {
        Ready(op);
        for (uint32_t i = 0; i < offs_.size(); ++i)
            if (busy_[i] && detail::Access::ArenaOf(t) == arena_.get() && detail::Access::Off(t) == offs_[i]) return i;
        detail::Fail(detail::Msg("TQue::", op, ": tensor was not allocated from this queue (or was already freed)"));
    }
    std::shared_ptr<detail::Arena> arena_;
    std::vector<uint32_t> offs_;
    std::vector<bool> busy_;  // allocated and not yet freed
    std::deque<uint32_t> queue_;
    uint32_t len_ = 0;
    uint32_t next_ = 0;
};

template <TPosition P> class TBuf {
public:
    template <class T> LocalTensor<T> Get() {
        Ready();
        return detail::Access::Make<T>(arena_, off_, len_);
    }
    template <class T> LocalTensor<T> Get(uint32_t count) {
        Ready();
        if (uint64_t(count) * sizeof(T) > len_)
            detail::FailRange(detail::Msg("TBuf::Get: ", count, " elements (", uint64_t(count) * sizeof(T),
                                          " bytes) exceed the buffer's ", len_, " bytes"));
        return detail::Access::Make<T>(arena_, off_, uint32_t(count * sizeof(T)));
    }

private:
    friend class TPipe;
    void Claim() const {
        detail::CheckUbPosition(P, "TBuf");
        if (arena_) detail::Fail("TPipe::InitBuffer: this TBuf already has a buffer");
    }
    void Init(const std::shared_ptr<detail::Arena>& arena, uint32_t off, uint32_t len) {
        arena_ = arena;
        off_ = off;
        len_ = len;
    }
    void Ready() const {
        if (!arena_) detail::Fail("TBuf::Get: TBuf has no buffer (TPipe::InitBuffer missing)");
    }
    std::shared_ptr<detail::Arena> arena_;
    uint32_t off_ = 0;
    uint32_t len_ = 0;
};

// Owns one 192 KiB UB arena and carves buffers from it in order. Only one TPipe may be alive at a
// time (per thread): on the chip two pipes would share one UB.
class TPipe {
public:
    TPipe() {
        if (detail::pipeAlive)
            detail::Fail("TPipe: a second TPipe while one is alive (on the chip both would share one UB)");
        detail::pipeAlive = true;
        arena_ = std::make_shared<detail::Arena>();
    }
    ~TPipe() { detail::pipeAlive = false; }
    TPipe(const TPipe&) = delete;
    TPipe& operator=(const TPipe&) = delete;

    template <class Q> void InitBuffer(Q& que, uint8_t num, uint32_t len) {
        if (num == 0) detail::Fail("TPipe::InitBuffer: num must be at least 1");
        que.Claim();
        que.Init(arena_, Carve(num, len), num, len);
    }
    template <TPosition P> void InitBuffer(TBuf<P>& buf, uint32_t len) {
        buf.Claim();
        buf.Init(arena_, Carve(1, len), len);
    }

private:
    friend struct detail::MatmulRegistry;
    uint32_t Carve(uint32_t num, uint32_t len) {
        if (len == 0 || len % 32)
            detail::Fail(detail::Msg("TPipe::InitBuffer: len ", len, " bytes is not a positive multiple of 32"));
        const uint64_t need = uint64_t(num) * len;
        if (used_ + need > detail::kUbBytes)
            detail::Fail(detail::Msg("TPipe::InitBuffer: ", num, " x ", len, " bytes on top of ", used_,
                                     " already used exceed the UB's ", detail::kUbBytes, " bytes"));
        const uint32_t off = uint32_t(used_);
        used_ += need;
        return off;
    }
    std::shared_ptr<detail::Arena> arena_;
    uint64_t used_ = 0;
    bool matmulRegistered_ = false;  // REGIST_MATMUL_OBJ was called on this pipe
};

// ---------------------------------------------------------------------------------------------
// Data movement

namespace detail {
inline void CheckCopyBytes(uint64_t bytes) {
    if (bytes % 32) Fail(Msg("DataCopy: ", bytes, " bytes is not a multiple of 32 (use DataCopyPad)"));
}
}  // namespace detail

template <class T> inline void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, uint32_t count) {
    detail::CheckCopyBytes(uint64_t(count) * sizeof(T));
    uint8_t* d = detail::Access::Vec("DataCopy", "dst", dst, count);
    std::memcpy(d, detail::Access::Gm(src, 0, count, "DataCopy"), count * sizeof(T));
}
template <class T> inline void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
    detail::CheckCopyBytes(uint64_t(count) * sizeof(T));
    const uint8_t* s = detail::Access::Vec("DataCopy", "src", src, count);
    std::memcpy(detail::Access::Gm(dst, 0, count, "DataCopy"), s, count * sizeof(T));
}
template <class T> inline void DataCopy(const LocalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
    detail::CheckCopyBytes(uint64_t(count) * sizeof(T));
    uint8_t* d = detail::Access::Vec("DataCopy", "dst", dst, count);
    std::memmove(d, detail::Access::Vec("DataCopy", "src", src, count), count * sizeof(T));
}

struct DataCopyExtParams {
    uint16_t blockCount = 0;
    uint32_t blockLen = 0;   // bytes
    uint32_t srcStride = 0;  // GM side: bytes; UB side: 32-byte blocks
    uint32_t dstStride = 0;
    uint32_t rsv = 0;
    DataCopyExtParams() = default;
    DataCopyExtParams(uint16_t count, uint32_t len, uint32_t srcStrideIn, uint32_t dstStrideIn, uint32_t rsvIn = 0)
        : blockCount(count), blockLen(len), srcStride(srcStrideIn), dstStride(dstStrideIn), rsv(rsvIn) {}
};

template <class T> struct DataCopyPadExtParams {
    bool isPad = false;
    uint8_t leftPadding = 0;
    uint8_t rightPadding = 0;
    T paddingValue = T(0);
    DataCopyPadExtParams() = default;
    DataCopyPadExtParams(bool isPadIn, uint8_t left, uint8_t right, T value)
        : isPad(isPadIn), leftPadding(left), rightPadding(right), paddingValue(value) {}
};

namespace detail {
template <class T> void CheckPadParams(const DataCopyExtParams& p, uint32_t gmStride) {
    if (p.blockCount == 0 || p.blockLen == 0)
        Fail(Msg("DataCopyPad: blockCount ", p.blockCount, " and blockLen ", p.blockLen, " must be positive"));
    if (p.blockLen % sizeof(T) || gmStride % sizeof(T))
        Fail(Msg("DataCopyPad: blockLen ", p.blockLen, " and GM stride ", gmStride, " bytes must be multiples of the ",
                 sizeof(T), "-byte element"));
}
}  // namespace detail

// GM -> UB: blocks of blockLen bytes; each UB block takes ceil32(blockLen) bytes plus dstStride blocks.
template <class T>
inline void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyExtParams& p,
                        const DataCopyPadExtParams<T>& pad) {
    detail::CheckPadParams<T>(p, p.srcStride);
    if (pad.leftPadding || pad.rightPadding)
        detail::Fail("DataCopyPad: leftPadding/rightPadding other than 0 are not modelled");
    const uint64_t len = p.blockLen, ubLen = detail::Ceil32(len), n = len / sizeof(T);
    for (uint64_t i = 0; i < p.blockCount; ++i) {
        uint8_t* d = detail::Access::Bytes("DataCopyPad", "dst", dst, i * (ubLen + p.dstStride * 32ull), ubLen);
        std::memcpy(d, detail::Access::Gm(src, i * (len + p.srcStride) / sizeof(T), n, "DataCopyPad"), len);
        if (pad.isPad)
            for (uint64_t b = len; b < ubLen; b += sizeof(T)) detail::Store<T>(d + b, pad.paddingValue);
    }
}

// UB -> GM: only blockLen bytes per block reach GM.
template <class T>
inline void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyExtParams& p) {
    detail::CheckPadParams<T>(p, p.dstStride);
    const uint64_t len = p.blockLen, ubLen = detail::Ceil32(len), n = len / sizeof(T);
    for (uint64_t i = 0; i < p.blockCount; ++i) {
        const uint8_t* s = detail::Access::Bytes("DataCopyPad", "src", src, i * (ubLen + p.srcStride * 32ull), len);
        std::memcpy(detail::Access::Gm(dst, i * (len + p.dstStride) / sizeof(T), n, "DataCopyPad"), s, len);
    }
}

// ---------------------------------------------------------------------------------------------
// Vector unit

namespace detail {
template <class T, class F> void Map1(const char* op, const LocalTensor<T>& dst, const LocalTensor<T>& src, int64_t n, F f) {
    uint8_t* d = Access::Vec(op, "dst", dst, n);
    const uint8_t* s = Access::Vec(op, "src", src, n);
    Access::NoPartialOverlap(op, "src", dst, src, n);
    for (int64_t i = 0; i < n; ++i)
        Store<T>(d + i * sizeof(T), static_cast<T>(f(static_cast<Calc<T>>(Load<T>(s + i * sizeof(T))))));
}
template <class T, class F>
void Map2(const char* op, const LocalTensor<T>& dst, const LocalTensor<T>& a, const LocalTensor<T>& b, int64_t n, F f) {
    uint8_t* d = Access::Vec(op, "dst", dst, n);
    const uint8_t* pa = Access::Vec(op, "src0", a, n);
    const uint8_t* pb = Access::Vec(op, "src1", b, n);
    Access::NoPartialOverlap(op, "src0", dst, a, n);
    Access::NoPartialOverlap(op, "src1", dst, b, n);
    for (int64_t i = 0; i < n; ++i)
        Store<T>(d + i * sizeof(T), static_cast<T>(f(static_cast<Calc<T>>(Load<T>(pa + i * sizeof(T))),
                                                     static_cast<Calc<T>>(Load<T>(pb + i * sizeof(T))))));
}
// Max/Min propagate NaN so that poisoned inputs stay visible.
template <class C> C VMax(C a, C b) { return IsNaN(a) ? a : IsNaN(b) ? b : (a > b ? a : b); }
template <class C> C VMin(C a, C b) { return IsNaN(a) ? a : IsNaN(b) ? b : (a < b ? a : b); }
template <class C> C VAbs(C a) {
    if constexpr (std::is_floating_point_v<C>) return std::fabs(a);  // clears the sign of -0 too
    else return a < 0 ? C(-a) : a;
}
}  // namespace detail

#define TF_FLOATY(NAME) static_assert(detail::kFloaty<T>, #NAME " needs half, bfloat16_t or float")
#define TF_BINARY(NAME, CHECK, EXPR)                                                                          \
    template <class T>                                                                                        \
    inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1, int32_t count) { \
        CHECK;                                                                                                \
        detail::Map2(#NAME, dst, src0, src1, count, [](detail::Calc<T> a, detail::Calc<T> b) { return EXPR; }); \
    }
#define TF_SCALAR(NAME, EXPR)                                                                                 \
    template <class T> inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, T scalar, int32_t count) { \
        const detail::Calc<T> b = static_cast<detail::Calc<T>>(scalar);                                       \
        detail::Map1(#NAME, dst, src, count, [b](detail::Calc<T> a) { return EXPR; });                       \
    }
#define TF_UNARY(NAME, CHECK, COUNT, EXPR)                                                                    \
    template <class T> inline void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, COUNT count) {  \
        CHECK;                                                                                                \
        detail::Map1(#NAME, dst, src, count, [](detail::Calc<T> a) { return EXPR; });                        \
    }

TF_BINARY(Add, (void)0, a + b)
TF_BINARY(Sub, (void)0, a - b)
TF_BINARY(Mul, (void)0, a * b)
TF_BINARY(Div, TF_FLOATY(Div), a / b)
TF_BINARY(Max, (void)0, detail::VMax(a, b))
TF_BINARY(Min, (void)0, detail::VMin(a, b))
TF_SCALAR(Adds, a + b)
TF_SCALAR(Muls, a * b)
TF_SCALAR(Maxs, detail::VMax(a, b))
TF_SCALAR(Mins, detail::VMin(a, b))
TF_UNARY(Exp, TF_FLOATY(Exp), int32_t, std::exp(a))
TF_UNARY(Ln, TF_FLOATY(Ln), int32_t, std::log(a))
TF_UNARY(Abs, (void)0, int32_t, detail::VAbs(a))
TF_UNARY(Reciprocal, TF_FLOATY(Reciprocal), int32_t, 1.0f / a)
TF_UNARY(Sqrt, TF_FLOATY(Sqrt), int32_t, std::sqrt(a))
TF_UNARY(Relu, (void)0, int32_t, detail::VMax(a, detail::Calc<T>(0)))
// CANN lib/math (advanced APIs): unlike the basic vector ops, their source and destination must not
// overlap at all (CANN's Tanh / Erf: "不支持源操作数与目的操作数地址重叠"), in place included.
#define TF_LIBMATH(NAME)                                                                                      \
    TF_FLOATY(NAME);                                                                                          \
    if (detail::Access::Overlap(dst, count, src, count))                                                      \
        detail::Fail(#NAME ": dst overlaps src (CANN lib/math APIs take no overlapping operands, in place included)")
TF_UNARY(Tanh, TF_LIBMATH(Tanh), uint32_t, std::tanh(a))  // CANN lib/math
TF_UNARY(Erf, TF_LIBMATH(Erf), uint32_t, std::erf(a))     // CANN lib/math
#undef TF_LIBMATH
#undef TF_FLOATY
#undef TF_BINARY
#undef TF_SCALAR
#undef TF_UNARY

template <class T> inline void Duplicate(const LocalTensor<T>& dst, T scalar, int32_t count) {
    uint8_t* d = detail::Access::Vec("Duplicate", "dst", dst, count);
    for (int32_t i = 0; i < count; ++i) detail::Store<T>(d + i * sizeof(T), scalar);
}

enum class RoundMode { CAST_NONE, CAST_RINT, CAST_FLOOR, CAST_CEIL, CAST_ROUND, CAST_TRUNC, CAST_ODD };

namespace detail {
template <class T> constexpr const char* TypeName() {
    if constexpr (std::is_same_v<T, float>) return "float";
    else if constexpr (std::is_same_v<T, half>) return "half";
    else if constexpr (std::is_same_v<T, bfloat16_t>) return "bfloat16_t";
    else return "int32_t";
}
// The neighbouring representable value of a binary16/bfloat16/float, toward +inf or -inf.
template <class D> D Step(D v, bool up) {
    using U = std::conditional_t<sizeof(D) == 2, uint16_t, uint32_t>;
    const U sign = U(U(1) << (8 * sizeof(U) - 1));
    U b;
    std::memcpy(&b, &v, sizeof b);
    if ((b & U(~sign)) == 0) b = up ? U(1) : U(sign | 1u);  // from +-0 to the smallest subnormal
    else if (((b & sign) == 0) == up) ++b;                 // magnitude grows (inf - 1 step = max finite)
    else --b;
    std::memcpy(&v, &b, sizeof b);
    return v;
}
template <class D> bool OddBits(D v) {
    uint8_t low;
    std::memcpy(&low, &v, 1);  // little-endian: lowest mantissa bit
    return low & 1;
}
// Narrowing to a floating type: `x` exactly as double, `r` its nearest-even rounding in D.
template <class D> D RoundTo(double x, D r, RoundMode m) {
    const double rd = double(static_cast<float>(r));
    if (std::isnan(x) || rd == x || m == RoundMode::CAST_RINT || m == RoundMode::CAST_NONE) return r;
    const D lo = rd > x ? Step(r, false) : r, hi = rd > x ? r : Step(r, true);
    switch (m) {
        case RoundMode::CAST_FLOOR: return lo;
        case RoundMode::CAST_CEIL: return hi;
        case RoundMode::CAST_TRUNC: return x > 0 ? lo : hi;
        case RoundMode::CAST_ODD: return OddBits(lo) ? lo : hi;
        default:  // CAST_ROUND: nearest, ties away from zero
            if (x - double(static_cast<float>(lo)) == double(static_cast<float>(hi)) - x) return x > 0 ? hi : lo;
            return r;
    }
}
template <class D, class S> D CastOne(S s, RoundMode m) {
    constexpr bool exact = (std::is_same_v<S, half> || std::is_same_v<S, bfloat16_t>) && std::is_same_v<D, float>;
    if constexpr (exact) {
        if (m != RoundMode::CAST_NONE) Fail(Msg("Cast: ", TypeName<S>(), "->float is exact; use CAST_NONE"));
        return static_cast<float>(s);
    } else if constexpr (std::is_same_v<D, int32_t>) {
        const double x = static_cast<float>(s);
        double r;
        switch (m) {
            case RoundMode::CAST_RINT: r = std::nearbyint(x); break;
            case RoundMode::CAST_FLOOR: r = std::floor(x); break;
            case RoundMode::CAST_CEIL: r = std::ceil(x); break;
            case RoundMode::CAST_ROUND: r = std::round(x); break;
            case RoundMode::CAST_TRUNC: r = std::trunc(x); break;
            default: Fail(Msg("Cast: ", TypeName<S>(), "->int32_t needs CAST_RINT/FLOOR/CEIL/ROUND/TRUNC"));
        }
        if (std::isnan(r)) return 0;
        return r >= 2147483647.0 ? INT32_MAX : r <= -2147483648.0 ? INT32_MIN : int32_t(r);  // saturates
    } else {
        const double x = std::is_same_v<S, int32_t> ? double(s) : double(static_cast<float>(s));
        return RoundTo<D>(x, static_cast<D>(s), m);
    }
}
}  // namespace detail

// Supported: float->half/bfloat16_t/int32_t, half/bfloat16_t->float (CAST_NONE), int32_t->float,
// half->int32_t. Narrowing rounds per `mode`; CAST_NONE narrows to nearest-even.
template <class D, class S>
inline void Cast(const LocalTensor<D>& dst, const LocalTensor<S>& src, RoundMode mode, uint32_t count) {
    constexpr bool ok = (std::is_same_v<S, float> && !std::is_same_v<D, float> && (detail::kFloaty<D> || std::is_same_v<D, int32_t>)) ||
                        ((std::is_same_v<S, half> || std::is_same_v<S, bfloat16_t>) && std::is_same_v<D, float>) ||
                        (std::is_same_v<S, int32_t> && std::is_same_v<D, float>) ||
                        (std::is_same_v<S, half> && std::is_same_v<D, int32_t>);
    static_assert(ok, "Cast: this type pair is not in the double");
    uint8_t* d = detail::Access::Vec("Cast", "dst", dst, count);
    const uint8_t* s = detail::Access::Vec("Cast", "src", src, count);
    if (sizeof(D) == sizeof(S)) detail::Access::NoPartialOverlap("Cast", "src", dst, src, count);
    else if (detail::Access::Overlap(dst, count, src, count)) detail::Fail("Cast: dst overlaps src of a different width");
    for (uint32_t i = 0; i < count; ++i)
        detail::Store<D>(d + i * sizeof(D), detail::CastOne<D>(detail::Load<S>(s + i * sizeof(S)), mode));
}

namespace detail {
// Checks shared by the reductions; fills workLocal with 0xFF afterwards, as the hardware leaves
// scratch data there that no caller may rely on.
template <class T, class F>
void Reduce(const char* op, const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& work,
            int32_t count, uint32_t dstCount, F f) {
    if (count <= 0) Fail(Msg(op, ": count ", count, " must be positive"));
    uint8_t* d = Access::Vec(op, "dst", dst, dstCount);
    const uint8_t* s = Access::Vec(op, "src", src, count);
    uint8_t* w = Access::Vec(op, "workLocal", work, count);
    if (Access::Overlap(work, count, src, count) || Access::Overlap(work, count, dst, dstCount))
        Fail(Msg(op, ": workLocal overlaps src or dst"));
    if (Access::Overlap(dst, dstCount, src, count) && Access::Off(dst) != Access::Off(src))
        Fail(Msg(op, ": dst partially overlaps src"));
    std::vector<Calc<T>> v(count);
    for (int32_t i = 0; i < count; ++i) v[i] = static_cast<Calc<T>>(Load<T>(s + i * sizeof(T)));
    std::memset(w, 0xFF, count * sizeof(T));
    f(v, d);
}
}  // namespace detail

// dst[0] = max of src[0:count] (NaN if any is NaN); with calIndex, dst[1] holds the first index of
// the maximum as an unsigned integer of sizeof(T) bytes (read it back via ReinterpretCast).
template <class T>
inline void ReduceMax(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& workLocal,
                      int32_t count, bool calIndex = false) {
    detail::Reduce("ReduceMax", dst, src, workLocal, count, calIndex ? 2 : 1, [&](const auto& v, uint8_t* d) {
        size_t best = 0;
        for (size_t i = 1; i < v.size() && !detail::IsNaN(v[best]); ++i)
            if (detail::IsNaN(v[i]) || v[i] > v[best]) best = i;
        detail::Store<T>(d, static_cast<T>(v[best]));
        if (calIndex) {
            using U = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;
            detail::Store<U>(d + sizeof(T), U(best));
        }
    });
}

// dst[0] = sum of src[0:count], accumulated in float and rounded to T once.
template <class T>
inline void ReduceSum(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<T>& workLocal, int32_t count) {
    detail::Reduce("ReduceSum", dst, src, workLocal, count, 1, [](const auto& v, uint8_t* d) {
        detail::Calc<T> sum = 0;
        for (auto x : v) sum += x;
        detail::Store<T>(d, static_cast<T>(sum));
    });
}

}  // namespace AscendC
