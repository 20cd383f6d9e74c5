/* Uses vector state without asking CPUID, in one thread of two:
 *   touch KIND SECONDS     KIND: sse | avx | zmm
 * Prints "toucher=TID idle=TID" and then keeps both threads alive for SECONDS.
 * avx leaves YMM0's upper half non-zero (XSTATE_BV bit 2); zmm leaves ZMM0's upper half,
 * k1 and ZMM16 non-zero (bits 5-7). Neither runs vzeroupper, so the state stays in use. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *kind;
static int seconds;
static volatile long toucher_tid;

static void *touch(void *unused)
{
    (void)unused;
    static const double ones[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    if (strcmp(kind, "avx") == 0)
        __asm__ volatile("vmovupd %0, %%ymm0" ::"m"(ones) : "xmm0");
#ifdef __AVX512F__
    else if (strcmp(kind, "zmm") == 0)
        __asm__ volatile("vmovupd %0, %%zmm0\n\tkxnorw %%k1, %%k1, %%k1\n\t"
                         "vmovupd %0, %%zmm16" ::"m"(ones)
                         : "xmm0", "xmm16");
#endif
    else
        __asm__ volatile("movupd %0, %%xmm0" ::"m"(ones) : "xmm0");
    toucher_tid = syscall(SYS_gettid);
    /* sleep with raw syscalls: no library code that could tidy vector state up */
    struct timespec ts = {seconds, 0};
    syscall(SYS_nanosleep, &ts, NULL);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    kind = argv[1];
    seconds = atoi(argv[2]);
    pthread_t t;
    pthread_create(&t, NULL, touch, NULL);
    while (!toucher_tid)
        usleep(1000);
    printf("toucher=%ld idle=%ld\n", toucher_tid, (long)syscall(SYS_gettid));
    fflush(stdout);
    pthread_join(t, NULL);
    return 0;
}
