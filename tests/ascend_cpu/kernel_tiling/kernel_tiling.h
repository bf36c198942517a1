// CPU test double: the Matmul tiling POD shared by host tiling code and kernels (see ../API.md).
#pragma once

#include <cstdint>

struct TCubeTiling {
    int32_t usedCoreNum;
    int32_t M, N, Ka, Kb;
    int32_t singleCoreM, singleCoreN, singleCoreK;
    int32_t baseM, baseN, baseK;
    int32_t depthA1, depthB1, stepM, stepN;
    int32_t isBias, iterateOrder;
    int32_t dbL0A, dbL0B, dbL0C;
};
