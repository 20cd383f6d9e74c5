/* A process tree that exercises every way the supervisor must follow: fork, vfork+exec,
 * a thread that execs (non-leader exec), and many threads running CPUID at once.
 *   tree VIEW_PROGRAM */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static char *view;

static void *exec_from_thread(void *unused)
{
    (void)unused;
    execl(view, view, (char *)NULL);
    perror("execl from thread");
    _exit(126);
}

static void *spin_cpuid(void *unused)
{
    (void)unused;
    unsigned a, b, c, d;
    for (int i = 0; i < 200; i++)
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    return (void *)(long)b;
}

int main(int argc, char **argv)
{
    int status;
    if (argc < 2)
        return 2;
    view = argv[1];
    /* many threads trapping concurrently */
    pthread_t th[8];
    for (int i = 0; i < 8; i++)
        pthread_create(&th[i], NULL, spin_cpuid, NULL);
    for (int i = 0; i < 8; i++)
        pthread_join(th[i], NULL);
    /* fork: the child inherits faulting and runs the view without exec */
    pid_t p = fork();
    if (p == 0) {
        execl(view, view, "-t", "1", (char *)NULL);
        _exit(126);
    }
    waitpid(p, &status, 0);
    /* vfork + exec */
    p = vfork();
    if (p == 0) {
        execl(view, view, (char *)NULL);
        _exit(126);
    }
    waitpid(p, &status, 0);
    /* fork, then exec from a thread that is not the leader */
    p = fork();
    if (p == 0) {
        pthread_t t;
        pthread_create(&t, NULL, exec_from_thread, NULL);
        pause();
    }
    waitpid(p, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
