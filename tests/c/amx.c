/* AMX permission and use:
 *   amx request   ARCH_REQ_XCOMP_PERM(18): prints "request 0" or "request -errno"
 *   amx tile      ldtilecfg + tilezero without asking: SIGILL unless permitted */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    if (strcmp(argv[1], "request") == 0) {
        long r = syscall(SYS_arch_prctl, 0x1023, 18);
        printf("request %ld\n", r == 0 ? 0 : -(long)errno);
        return 0;
    }
    static uint8_t cfg[64] __attribute__((aligned(64)));
    cfg[0] = 1;                 /* palette 1 */
    cfg[16] = 64; cfg[48] = 16; /* tmm0: 16 rows of 64 bytes */
    __asm__ volatile(".byte 0xc4,0xe2,0x78,0x49,0x00" ::"a"(cfg)); /* ldtilecfg (%rax) */
    __asm__ volatile(".byte 0xc4,0xe2,0x7b,0x49,0xc0");            /* tilezero %tmm0 */
    __asm__ volatile(".byte 0xc4,0xe2,0x78,0x49,0xc0");            /* tilerelease */
    puts("tile ok");
    return 0;
}
