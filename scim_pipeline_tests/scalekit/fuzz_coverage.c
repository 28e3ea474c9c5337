/* Edge coverage for fuzzing the extension, linked into the sanitized build `make fuzz` makes and nowhere else.
 *
 * gcc has no libFuzzer, but -fsanitize-coverage=trace-pc makes the code it compiles call __sanitizer_cov_trace_pc at
 * every basic block. This counts each edge (the pair of blocks, hashed, as AFL does) in a map, and
 * scim_fuzz_novel() tells fuzz_records.py (through ctypes) whether the inputs run since it was last called reached an
 * edge, or an edge's count class, never seen before: the fuzzer keeps those inputs. This file is compiled without
 * that flag (it would call itself), and the hook is hidden so that the extension's calls bind here, not to a
 * sanitizer runtime's. */
#include <stdint.h>

#define MAP_SIZE 65536

static uint64_t counts[MAP_SIZE / 8]; /* a byte an edge, read eight at a time to skip the untouched ones */
static unsigned char seen[MAP_SIZE];
static unsigned features;
static uintptr_t previous;

__attribute__((visibility("hidden"))) void __sanitizer_cov_trace_pc(void) {
    unsigned char *map = (unsigned char *)counts;
    uintptr_t here = (uintptr_t)(((uint64_t)(uintptr_t)__builtin_return_address(0) * 0x9E3779B97F4A7C15ULL) >> 48);
    uintptr_t edge = (here ^ previous) & (MAP_SIZE - 1);
    if (map[edge] != 255) map[edge]++;
    previous = here >> 1; /* shifted, so that A->B and B->A differ */
}

/* AFL's count classes: an edge taken 1, 2, 3, 4-7, 8-15, 16-31, 32-127 or 128+ times, one bit each. */
static unsigned char count_class(unsigned char n) {
    return n == 0 ? 0 : n == 1 ? 1 : n == 2 ? 2 : n == 3 ? 4 : n < 8 ? 8 : n < 16 ? 16 : n < 32 ? 32
         : n < 128 ? 64 : 128;
}

int scim_fuzz_novel(void) {
    unsigned char *map = (unsigned char *)counts;
    int novel = 0;
    for (unsigned w = 0; w < MAP_SIZE / 8; w++) {
        if (!counts[w]) continue;
        for (unsigned i = w * 8; i < w * 8 + 8; i++) {
            unsigned char fresh = count_class(map[i]) & (unsigned char)~seen[i];
            if (fresh) {
                seen[i] |= fresh;
                features += (unsigned)__builtin_popcount(fresh);
                novel = 1;
            }
        }
        counts[w] = 0;
    }
    previous = 0;
    return novel;
}

unsigned scim_fuzz_features(void) { return features; }
