/* Independent oracle for `xcr0run --show --json`: reads XCR0, CPUID leaf 0xD and the
 * kernel's XSAVE permissions itself and prints "key value" lines. */
#include <cpuid.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

static uint64_t xgetbv(uint32_t index)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(index));
    return ((uint64_t)hi << 32) | lo;
}

static void arch_get(const char *name, int code)
{
    uint64_t value = 0;
    if (syscall(SYS_arch_prctl, code, &value) == 0)
        printf("%s %#llx\n", name, (unsigned long long)value);
    else
        printf("%s none\n", name);
}

int main(void)
{
    unsigned a, b, c, d;
    printf("xcr0 %#llx\n", (unsigned long long)xgetbv(0));
    __cpuid_count(0xd, 0, a, b, c, d);
    printf("user_supported %#llx\n", ((unsigned long long)d << 32) | a);
    printf("size_enabled %u\nsize_supported %u\n", b, c);
    __cpuid_count(0xd, 1, a, b, c, d);
    printf("size_compacted %u\n", b);
    printf("supervisor_supported %#llx\n", ((unsigned long long)d << 32) | c);
    printf("xgetbv1 %d\n", (a >> 2) & 1);
    for (int i = 2; i < 20; i++) {
        __cpuid_count(0xd, i, a, b, c, d);
        printf("component %d size %u offset %u align64 %u xfd %u\n", i, a, b, (c >> 1) & 1,
               (c >> 2) & 1);
    }
    arch_get("xcomp_supp", 0x1021);
    arch_get("xcomp_perm", 0x1022);
    long faulting = syscall(SYS_arch_prctl, 0x1012, 1);
    printf("faulting %d\n", faulting == 0);
    return 0;
}
