/* Does this CPU track which XSAVE components are in their initial state? Real ones do
 * (XSTATE_BV bit 2 is clear after VZEROUPPER); some emulators report every enabled
 * component as in use. Prints "tracks" or "no-tracking". */
#include <cpuid.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void)
{
    unsigned a, b, c, d;
    __cpuid_count(0xd, 0, a, b, c, d);
    uint8_t *area = aligned_alloc(64, (b + 63) & ~63u);
    memset(area, 0, b);
    static const double ones[4] = {1, 1, 1, 1};
    __asm__ volatile("vmovupd %0, %%ymm0\n\tvzeroupper" ::"m"(ones) : "xmm0");
    __asm__ volatile("xsave (%0)" ::"r"(area), "a"(0xffffffff), "d"(0xffffffff) : "memory");
    uint64_t bv;
    memcpy(&bv, area + 512, 8);
    puts(bv & 4 ? "no-tracking" : "tracks");
    return 0;
}
