/* One thread sits in vfork() (its child sleeps, then _exits) while main exits: the
 * program ends at once and the child lives on as an orphan. argv[1]: the child's sleep. */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static unsigned seconds = 5;

static void *worker(void *arg)
{
    (void)arg;
    pid_t child = vfork();
    if (child == 0) {
        /* Off the caller's pipes, so whoever reads them sees EOF at the program's end. */
        int null = open("/dev/null", O_RDWR);
        dup2(null, 0), dup2(null, 1), dup2(null, 2);
        sleep(seconds);
        _exit(0);
    }
    int status;
    waitpid(child, &status, 0);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc > 1)
        seconds = (unsigned)atoi(argv[1]);
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    usleep(300000);
    puts("main exits");
    fflush(stdout);
    exit(0);
}
