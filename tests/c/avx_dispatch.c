/* Two ways to decide whether AVX may be used, as found in the wild.
 *
 *   avx_dispatch cpuid-only   trusts CPUID.1:ECX.AVX alone (the bug of Halide PR 9017 and
 *                             aklomp/base64 issue 113): dies of SIGILL where the OS has
 *                             not enabled AVX in XCR0 but CPUID still advertises it
 *   avx_dispatch xcr0         the documented check: AVX and OSXSAVE in CPUID, then
 *                             XCR0 bits 1-2 from xgetbv; falls back to SSE otherwise
 *
 * Prints "avx path" or "sse path" and the sum it computed with that path. */
#include <cpuid.h>
#include <stdio.h>
#include <string.h>

static float data[8] = {1, 2, 3, 4, 5, 6, 7, 8};

__attribute__((target("avx"))) static float sum_avx(void)
{
    float out[8];
    __asm__ volatile("vmovups %1, %%ymm0\n\t"
                     "vaddps %%ymm0, %%ymm0, %%ymm0\n\t"
                     "vmovups %%ymm0, %0\n\t"
                     "vzeroupper"
                     : "=m"(out)
                     : "m"(data)
                     : "xmm0");
    float s = 0;
    for (int i = 0; i < 8; i++)
        s += out[i];
    return s;
}

static float sum_sse(void)
{
    float s = 0;
    for (int i = 0; i < 8; i++)
        s += 2 * data[i];
    return s;
}

int main(int argc, char **argv)
{
    unsigned a, b, c, d;
    __cpuid(1, a, b, c, d);
    int cpuid_avx = (c >> 28) & 1, osxsave = (c >> 27) & 1;
    int use_avx = cpuid_avx;
    if (argc > 1 && !strcmp(argv[1], "xcr0")) {
        unsigned lo = 0, hi = 0;
        if (osxsave)
            __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        use_avx = cpuid_avx && osxsave && (lo & 6) == 6;
    }
    printf("cpuid avx=%d osxsave=%d\n", cpuid_avx, osxsave);
    fflush(stdout);
    if (use_avx)
        printf("avx path %g\n", sum_avx());
    else
        printf("sse path %g\n", sum_sse());
    return 0;
}
