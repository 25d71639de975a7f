/* A stand-in for Windows' bcryptprimitives.dll, which Wine 8.0 (Debian bookworm) lacks:
 * Rust's std (1.78 and later) imports ProcessPrng from it, so without this file every
 * Rust .exe fails to load under that Wine. Built with mingw by scripts/windows-ci.sh and
 * copied into the Wine prefix; never shipped. */
#include <windows.h>
#include <bcrypt.h>

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len) {
        ULONG chunk = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG) != 0) return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
