/* The signal state a program sees around CPUID, in situations where the kernel's forced
 * SIGSEGV of a faulting CPUID would change it (SIGSEGV blocked or ignored). Prints one
 * line per case; the lines must be the same natively and under xcr0run. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static sigjmp_buf back;
static volatile sig_atomic_t handled;
static volatile unsigned sink;

static void ask(void)
{
    unsigned a, b, c, d;
    __cpuid_count(7, 0, a, b, c, d);
    sink += a + b + c + d;
}

static void on_segv(int sig)
{
    (void)sig;
    handled++;
    ask(); /* a crash reporter asking the CPU what it is, with SIGSEGV blocked */
    siglongjmp(back, 1);
}

static void on_usr1(int sig)
{
    (void)sig;
    ask(); /* sa_mask blocks SIGSEGV here */
}

static const char *disposition(int sig)
{
    struct sigaction now;
    sigaction(sig, NULL, &now);
    if (now.sa_handler == SIG_DFL)
        return "dfl";
    if (now.sa_handler == SIG_IGN)
        return "ign";
    return now.sa_handler == on_segv ? "handler" : "other";
}

static int segv_blocked(void)
{
    sigset_t now;
    pthread_sigmask(SIG_BLOCK, NULL, &now);
    return sigismember(&now, SIGSEGV);
}

static void handle_segv(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_segv;
    sigaction(SIGSEGV, &sa, NULL);
}

static void block_segv(int how)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGSEGV);
    pthread_sigmask(how, &set, NULL);
}

static void genuine_fault(const char *name)
{
    handled = 0;
    if (sigsetjmp(back, 1) == 0)
        *(volatile int *)16 = 1;
    printf("%s: fault caught=%d %s blocked=%d\n", name, (int)handled, disposition(SIGSEGV),
           segv_blocked());
}

static void *in_thread(void *unused)
{
    (void)unused;
    block_segv(SIG_BLOCK);
    for (int i = 0; i < 3; i++)
        ask();
    printf("thread: blocked=%d\n", segv_blocked());
    return NULL;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGSEGV, SIG_IGN);
    ask();
    printf("ignored: %s\n", disposition(SIGSEGV));

    handle_segv();
    block_segv(SIG_BLOCK);
    ask();
    ask();
    printf("handler+blocked: %s blocked=%d\n", disposition(SIGSEGV), segv_blocked());
    block_segv(SIG_UNBLOCK);
    genuine_fault("after handler+blocked");

    signal(SIGSEGV, SIG_DFL);
    block_segv(SIG_BLOCK);
    ask();
    printf("default+blocked: %s blocked=%d\n", disposition(SIGSEGV), segv_blocked());
    block_segv(SIG_UNBLOCK);

    handle_segv();
    handled = 0;
    if (sigsetjmp(back, 1) == 0)
        raise(SIGSEGV); /* the handler asks CPUID with SIGSEGV blocked */
    printf("cpuid in handler: handled=%d %s blocked=%d\n", (int)handled, disposition(SIGSEGV),
           segv_blocked());
    genuine_fault("after cpuid in handler");

    struct sigaction usr;
    memset(&usr, 0, sizeof usr);
    usr.sa_handler = on_usr1;
    sigfillset(&usr.sa_mask);
    sigaction(SIGUSR1, &usr, NULL);
    raise(SIGUSR1);
    printf("cpuid in a handler masking all: %s blocked=%d\n", disposition(SIGSEGV),
           segv_blocked());
    genuine_fault("after that");

    pthread_t t;
    pthread_create(&t, NULL, in_thread, NULL);
    pthread_join(t, NULL);
    printf("main after thread: %s blocked=%d\n", disposition(SIGSEGV), segv_blocked());
    return 0;
}
