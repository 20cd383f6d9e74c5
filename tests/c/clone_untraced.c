/* clone(CLONE_UNTRACED): the child reports whether it is traced, and exits with 7
 * through exit_group, then its parent reports how it ended. */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static char stack[65536];

static int child(void *arg)
{
    (void)arg;
    pid_t grandchild = fork();
    if (grandchild == 0)
        _exit(4);
    int status = 0;
    waitpid(grandchild, &status, 0);
    printf("grandchild: exited=%d code=%d\n", WIFEXITED(status), WEXITSTATUS(status));
    fflush(stdout);
    syscall(SYS_exit_group, 7);
    puts("exit_group returned");
    fflush(stdout);
    return 9;
}

int main(void)
{
    pid_t pid = clone(child, stack + sizeof stack, CLONE_UNTRACED | SIGCHLD, NULL);
    if (pid < 0) {
        perror("clone");
        return 1;
    }
    int status = 0;
    waitpid(pid, &status, 0);
    printf("child: exited=%d code=%d signal=%d\n", WIFEXITED(status), WEXITSTATUS(status),
           WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    return 0;
}
