// CPU test double of the host-side Matmul tiling API (see ../API.md): it records the shapes and
// the fixed split, fills TCubeTiling, and rejects splits that overflow the 910B L0 buffers.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "../kernel_tiling/kernel_tiling.h"

namespace matmul_tiling {

enum class TPosition { GM, A1, A2, B1, B2, C1, C2, CO1, CO2, VECIN, VECOUT, VECCALC, TSCM };
enum class CubeFormat { ND, NZ };
enum class DataType { DT_FLOAT16, DT_BF16, DT_FLOAT };

class MatmulApiTiling {
public:
    MatmulApiTiling() = default;
    void SetAType(TPosition, CubeFormat, DataType type, bool isTrans = false) { aType_ = type, (void)isTrans; }
    void SetBType(TPosition, CubeFormat, DataType type, bool isTrans = false) { bType_ = type, (void)isTrans; }
    void SetCType(TPosition, CubeFormat, DataType) {}
    void SetBiasType(TPosition, CubeFormat, DataType) {}
    void SetShape(int m, int n, int k) { m_ = m, n_ = n, k_ = k; }
    void SetOrgShape(int m, int n, int k) { orgM_ = m, orgN_ = n, orgK_ = k; }
    void SetBias(bool isBias) { bias_ = isBias; }
    void SetFixSplit(int baseM, int baseN, int baseK) { baseM_ = baseM, baseN_ = baseN, baseK_ = baseK; }
    void SetBufferSpace(int l1 = -1, int l0c = -1, int ub = -1) { (void)l1, (void)l0c, (void)ub; }  // L0 sizes are fixed on 910B

    // 0 on success; -1 for a non-positive dimension or a split that overflows L0A/L0B (64 KiB) or L0C (128 KiB).
    int64_t GetTiling(TCubeTiling& tiling) const {
        const int orgM = orgM_ > 0 ? orgM_ : m_, orgN = orgN_ > 0 ? orgN_ : n_, orgK = orgK_ > 0 ? orgK_ : k_;
        for (int d : {m_, n_, k_, orgM, orgN, orgK, baseM_, baseN_, baseK_})
            if (d <= 0) return -1;
        if (int64_t(baseM_) * baseK_ * Bytes(aType_) > 64 * 1024 || int64_t(baseN_) * baseK_ * Bytes(bType_) > 64 * 1024 ||
            int64_t(baseM_) * baseN_ * 4 > 128 * 1024)
            return -1;
        tiling = TCubeTiling{};
        tiling.usedCoreNum = 1;
        tiling.M = orgM, tiling.N = orgN, tiling.Ka = orgK, tiling.Kb = orgK;
        tiling.singleCoreM = m_, tiling.singleCoreN = n_, tiling.singleCoreK = k_;
        tiling.baseM = baseM_, tiling.baseN = baseN_, tiling.baseK = baseK_;
        tiling.depthA1 = tiling.depthB1 = tiling.stepM = tiling.stepN = 1;
        tiling.isBias = bias_ ? 1 : 0;
        tiling.iterateOrder = 0;
        tiling.dbL0A = tiling.dbL0B = tiling.dbL0C = 1;
        return 0;
    }

private:
    static int64_t Bytes(DataType t) { return t == DataType::DT_FLOAT ? 4 : 2; }
    DataType aType_ = DataType::DT_FLOAT16, bType_ = DataType::DT_FLOAT16;
    int m_ = 0, n_ = 0, k_ = 0, orgM_ = 0, orgN_ = 0, orgK_ = 0, baseM_ = -1, baseN_ = -1, baseK_ = -1;
    bool bias_ = false;
};

}  // namespace matmul_tiling
