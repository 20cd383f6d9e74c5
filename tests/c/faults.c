/* Genuine faults must stay genuine under the supervisor:
 *   faults segv      NULL dereference: dies of SIGSEGV
 *   faults gp        a general-protection fault (SI_KERNEL, like a trapped CPUID): dies
 *   faults handled   catches its own SIGSEGV (as a JVM does), runs CPUID, exits 0 */
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static sigjmp_buf back;

static void on_segv(int sig)
{
    (void)sig;
    siglongjmp(back, 1);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    if (strcmp(argv[1], "segv") == 0) {
        volatile int *p = (volatile int *)0;
        return *p;
    }
    if (strcmp(argv[1], "gp") == 0) {
        __asm__ volatile("hlt"); /* privileged: #GP in user mode -> SIGSEGV SI_KERNEL */
        return 0;
    }
    if (strcmp(argv[1], "handled") == 0) {
        signal(SIGSEGV, on_segv);
        int caught = 0;
        for (int i = 0; i < 3; i++) {
            if (sigsetjmp(back, 1) == 0) {
                volatile int *p = (volatile int *)0;
                (void)*p;
            } else {
                caught++;
            }
            unsigned a, b, c, d;
            __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
        }
        printf("caught %d\n", caught);
        return caught == 3 ? 0 : 1;
    }
    return 2;
}
