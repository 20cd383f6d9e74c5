/* A child made by clone() with exit signal 0 and no CLONE_THREAD: a separate process
 * that ptrace reports as a clone event. It execs /bin/true; the parent must live on. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static char stack[1 << 16];

static int child(void *unused)
{
    (void)unused;
    execl("/bin/true", "true", (char *)NULL);
    return 127;
}

int main(void)
{
    pid_t c = clone(child, stack + sizeof stack, 0, NULL);
    int status;
    waitpid(c, &status, __WALL);
    printf("parent done, child status %d\n", status);
    return 0;
}
