// CPU test double of CANN's host-side platform query (see ../../API.md): the sizes a host needs
// to launch a kernel on the current device.
#pragma once

#include <cstdint>

namespace platform_ascendc {

class PlatformAscendC {
public:
    // Bytes of the system workspace the Matmul API needs (the double's figure; the real one
    // depends on the SoC). The host allocates it in GM and the kernel passes it to SetSysWorkspace.
    uint32_t GetLibApiWorkSpaceSize() const { return 1024 * 1024; }
};

class PlatformAscendCManager {
public:
    static PlatformAscendC* GetInstance() {
        static PlatformAscendC instance;
        return &instance;
    }
};

}  // namespace platform_ascendc
