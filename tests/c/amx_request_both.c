/* Asks for AMX permission (ARCH_REQ_XCOMP_PERM) through the 64-bit system call and
 * through the 32-bit one (int 0x80, arch_prctl is 384 there); prints both results. */
#include <errno.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void)
{
    long r64 = syscall(SYS_arch_prctl, 0x1023, 18);
    long e64 = r64 < 0 ? -errno : r64;
    long r32;
    __asm__ volatile("int $0x80" : "=a"(r32) : "a"(384), "b"(0x1023), "c"(18) : "memory");
    printf("64=%ld 32=%ld\n", e64, r32);
    return 0;
}
