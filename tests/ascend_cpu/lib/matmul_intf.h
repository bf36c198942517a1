// CPU test double of the kernel-side high-level Matmul API (see ../API.md). It computes
// C = A * B (+ bias) in float straight from GM through GlobalTensor (so size checks apply); L1/L0
// staging and Nz layouts are the API's business and are not modelled.
#pragma once

#include <vector>

#include "../kernel_operator.h"
#include "../kernel_tiling/kernel_tiling.h"

#include <type_traits>

namespace AscendC {
namespace detail {
// REGIST_MATMUL_OBJ's checks on the pipe and the system workspace.
struct MatmulRegistry {
    static void Register(TPipe* pipe, GM_ADDR workspace) {
        if (!pipe) Fail("REGIST_MATMUL_OBJ: null TPipe");
        if (!workspace)
            Fail("REGIST_MATMUL_OBJ: the system workspace is null: the kernel must call SetSysWorkspace(workspace) "
                 "with a GM buffer of GetLibApiWorkSpaceSize() bytes allocated by the host before registering");
        if (pipe->matmulRegistered_)
            Fail("REGIST_MATMUL_OBJ: called twice on one TPipe; register every Matmul object in one call, each "
                 "followed by its tiling: REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm1, &tiling1, mm2, &tiling2)");
        if (pipe->used_)
            Fail("REGIST_MATMUL_OBJ after TPipe::InitBuffer: in separated mode (Atlas A2) it must come first");
        pipe->matmulRegistered_ = true;
    }
};
}  // namespace detail
}  // namespace AscendC

namespace matmul {

enum class CubeFormat { ND, NZ };

template <AscendC::TPosition POS, CubeFormat FMT, class T, bool ISTRANS = false> struct MatmulType {
    using T_ = T;
    static constexpr AscendC::TPosition pos = POS;
    static constexpr CubeFormat format = FMT;
    static constexpr bool isTrans = ISTRANS;
};

template <class A_TYPE, class B_TYPE, class C_TYPE, class BIAS_TYPE = C_TYPE> class Matmul {
    using A = typename A_TYPE::T_;
    using B = typename B_TYPE::T_;
    using C = typename C_TYPE::T_;
    using Bias = typename BIAS_TYPE::T_;
    static_assert(AscendC::detail::kFloaty<A> && AscendC::detail::kFloaty<B>, "Matmul: A/B must be half, bfloat16_t or float");
    static_assert(std::is_same_v<C, float>, "Matmul: C must be float");
    static_assert(A_TYPE::format == CubeFormat::ND && B_TYPE::format == CubeFormat::ND && C_TYPE::format == CubeFormat::ND,
                  "Matmul: only ND layouts are modelled");

public:
    // The tiling gives the default org and single shapes; the pipe only matters on the chip.
    void Init(const TCubeTiling* tiling, AscendC::TPipe* pipe = nullptr) {
        (void)pipe;
        if (!tiling) Fail("Init", "null tiling");
        if (tiling->baseM <= 0 || tiling->baseN <= 0 || tiling->baseK <= 0)
            Fail("Init", Msg("tiling base ", tiling->baseM, "x", tiling->baseN, "x", tiling->baseK, " must be positive"));
        *this = Matmul();
        t_ = *tiling;
        inited_ = true;
        SetOrgShape(t_.M, t_.N, t_.Ka, t_.Kb);
        SetSingleShape(t_.singleCoreM, t_.singleCoreN, t_.singleCoreK);
    }
    void SetOrgShape(int orgM, int orgN, int orgKa, int orgKb, int orgKc = 0) {
        Ready("SetOrgShape");
        if (orgM <= 0 || orgN <= 0 || orgKa <= 0 || orgKb <= 0 || orgKc < 0)
            Fail("SetOrgShape", Msg("shape ", orgM, ", ", orgN, ", ", orgKa, ", ", orgKb, ", ", orgKc, " must be positive"));
        orgM_ = orgM, orgN_ = orgN, orgKa_ = orgKa, orgKb_ = orgKb, orgKc_ = orgKc;
        Rearm();
    }
    void SetSingleShape(int singleM, int singleN, int singleK) {
        Ready("SetSingleShape");
        m_ = singleM, n_ = singleN, k_ = singleK;
        Rearm();
    }
    void SetTensorA(const AscendC::GlobalTensor<A>& gm, bool isTransposeA = false) {
        Ready("SetTensorA");
        if (isTransposeA && !A_TYPE::isTrans) Fail("SetTensorA", "isTransposeA needs MatmulType<..., ISTRANS = true>");
        a_ = gm, aTrans_ = isTransposeA, aSet_ = true;
        Rearm();
    }
    void SetTensorB(const AscendC::GlobalTensor<B>& gm, bool isTransposeB = false) {
        Ready("SetTensorB");
        if (isTransposeB && !B_TYPE::isTrans) Fail("SetTensorB", "isTransposeB needs MatmulType<..., ISTRANS = true>");
        b_ = gm, bTrans_ = isTransposeB, bSet_ = true;
        Rearm();
    }
    void SetBias(const AscendC::GlobalTensor<Bias>& gm) {
        Ready("SetBias");
        bias_ = gm, hasBias_ = true;
        Rearm();
    }
    void DisableBias() {
        Ready("DisableBias");
        hasBias_ = false;
        Rearm();
    }
    // The single shape fits one base block, so the first call computes it all and the next ends
    // the iteration (and re-arms it for the next SetTensorA/B round).
    bool Iterate(bool enPartialSum = false) {
        Ready("Iterate");
        if (enPartialSum) Fail("Iterate", "enPartialSum is not modelled");
        if (iterated_) {
            Rearm();
            return false;
        }
        CheckShape("Iterate", true);
        result_ = Compute("Iterate");
        iterated_ = true;
        return true;
    }
    // Row-major into UB with row stride baseN; the rest of the base tile is left untouched.
    void GetTensorC(const AscendC::LocalTensor<C>& ub, uint8_t enAtomic = 0, bool enSequentialWrite = false) {
        (void)enSequentialWrite;  // one base block: both layouts coincide
        Ready("GetTensorC");
        if (enAtomic) Fail("GetTensorC", "enAtomic into UB is not modelled");
        CheckShape("GetTensorC", true);
        if (result_.empty()) Fail("GetTensorC", "no result; call it after an Iterate() that returned true");
        const uint64_t ld = uint64_t(t_.baseN);
        // CANN: the C matrix passed in must hold at least baseM * baseN elements (the cube writes a
        // whole base block, padded rows included), whatever the single shape.
        uint8_t* d = AscendC::detail::Access::Vec("Matmul::GetTensorC", "ub", ub, int64_t(t_.baseM) * t_.baseN);
        for (int i = 0; i < m_; ++i)
            for (int j = 0; j < n_; ++j) AscendC::detail::Store<C>(d + (i * ld + j) * sizeof(C), result_[i * n_ + j]);
    }
    // C[i * ldc + j] in GM, ldc = orgKc or orgN; enAtomic 1 adds to what is there.
    void IterateAll(const AscendC::GlobalTensor<C>& gm, uint8_t enAtomic = 0) {
        Ready("IterateAll");
        if (enAtomic > 1) Fail("IterateAll", Msg("enAtomic ", int(enAtomic), " is not modelled (0 = write, 1 = add)"));
        CheckShape("IterateAll", false);
        const std::vector<float> c = Compute("IterateAll");
        const uint64_t ldc = uint64_t(orgKc_ ? orgKc_ : orgN_);
        for (int i = 0; i < m_; ++i)
            for (int j = 0; j < n_; ++j) {
                C* p = AscendC::detail::Access::Gm(gm, i * ldc + j, 1, "Matmul::IterateAll");
                *p = enAtomic ? *p + c[i * n_ + j] : c[i * n_ + j];
            }
    }
    void End() { inited_ = false; }

private:
    template <class... X> static std::string Msg(const X&... x) { return AscendC::detail::Msg(x...); }
    [[noreturn]] static void Fail(const char* op, const std::string& what) {
        AscendC::detail::Fail(Msg("Matmul::", op, ": ", what));
    }
    void Rearm() {
        iterated_ = false;
        result_.clear();
    }
    void Ready(const char* op) const {
        if (!inited_) Fail(op, "not initialised (REGIST_MATMUL_OBJ / Init missing, or used after End)");
    }
    void CheckShape(const char* op, bool oneBlock) const {
        if (m_ <= 0 || n_ <= 0 || k_ <= 0) Fail(op, Msg("single shape ", m_, "x", n_, "x", k_, " must be positive"));
        if (oneBlock && (m_ > t_.baseM || n_ > t_.baseN))
            Fail(op, Msg("single shape ", m_, "x", n_, " exceeds the base block ", t_.baseM, "x", t_.baseN));
        if (!aSet_ || !bSet_) Fail(op, "SetTensorA and SetTensorB must come first");
    }
    // Reads A and B once through their GlobalTensors, then accumulates in float.
    std::vector<float> Compute(const char* op) const {
        const std::string where = std::string("Matmul::") + op;
        std::vector<float> a(size_t(m_) * k_), b(size_t(k_) * n_), c(size_t(m_) * n_);
        for (int i = 0; i < m_; ++i)
            for (int k = 0; k < k_; ++k) {
                const uint64_t idx = aTrans_ ? uint64_t(k) * orgM_ + i : uint64_t(i) * orgKa_ + k;
                a[size_t(i) * k_ + k] = static_cast<float>(*AscendC::detail::Access::Gm(a_, idx, 1, where.c_str()));
            }
        for (int k = 0; k < k_; ++k)
            for (int j = 0; j < n_; ++j) {
                const uint64_t idx = bTrans_ ? uint64_t(j) * orgKb_ + k : uint64_t(k) * orgN_ + j;
                b[size_t(k) * n_ + j] = static_cast<float>(*AscendC::detail::Access::Gm(b_, idx, 1, where.c_str()));
            }
        for (int i = 0; i < m_; ++i)
            for (int j = 0; j < n_; ++j) {
                float acc = hasBias_ ? static_cast<float>(*AscendC::detail::Access::Gm(bias_, j, 1, where.c_str())) : 0.0f;
                for (int k = 0; k < k_; ++k) acc += a[size_t(i) * k_ + k] * b[size_t(k) * n_ + j];
                c[size_t(i) * n_ + j] = acc;
            }
        return c;
    }

    TCubeTiling t_{};
    bool inited_ = false, aSet_ = false, bSet_ = false, aTrans_ = false, bTrans_ = false, hasBias_ = false, iterated_ = false;
    int orgM_ = 0, orgN_ = 0, orgKa_ = 0, orgKb_ = 0, orgKc_ = 0, m_ = 0, n_ = 0, k_ = 0;
    AscendC::GlobalTensor<A> a_;
    AscendC::GlobalTensor<B> b_;
    AscendC::GlobalTensor<Bias> bias_;
    std::vector<float> result_;  // the current Iterate() block, row-major singleM x singleN
};

}  // namespace matmul

namespace matmul {
namespace detail {
template <class M> constexpr bool kIsMatmul = false;
template <class A, class B, class C, class D> constexpr bool kIsMatmul<Matmul<A, B, C, D>> = true;

inline void InitPairs(AscendC::TPipe*) {}
template <class M, class... Rest>
void InitPairs(AscendC::TPipe* pipe, M& mm, const TCubeTiling* tiling, Rest&&... rest) {
    static_assert(kIsMatmul<M>, "REGIST_MATMUL_OBJ: expected Matmul object / tiling pointer pairs");
    mm.Init(tiling, pipe);
    InitPairs(pipe, std::forward<Rest>(rest)...);
}

// One Matmul object without its tiling: Init(&tiling) must follow.
template <class M> void Regist(AscendC::TPipe* pipe, GM_ADDR workspace, M& mm) {
    static_assert(kIsMatmul<M>, "REGIST_MATMUL_OBJ: expected a Matmul object");
    AscendC::detail::MatmulRegistry::Register(pipe, workspace);
    (void)mm;
}
template <class... Args> void Regist(AscendC::TPipe* pipe, GM_ADDR workspace, Args&&... args) {
    static_assert(sizeof...(Args) % 2 == 0 && sizeof...(Args) <= 8,
                  "REGIST_MATMUL_OBJ: pass one Matmul object, or 1 to 4 Matmul object / tiling pointer pairs");
    AscendC::detail::MatmulRegistry::Register(pipe, workspace);
    InitPairs(pipe, std::forward<Args>(args)...);
}
}  // namespace detail
}  // namespace matmul

// CANN's variadic form: REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling) or, with
// several objects, all of them in one call, each followed by its tiling (up to 4). One call per
// TPipe, before any InitBuffer; the workspace must be set (SetSysWorkspace).
#define REGIST_MATMUL_OBJ(pipePtr, workspacePtr, ...) \
    ::matmul::detail::Regist((pipePtr), (workspacePtr), __VA_ARGS__)
