/* argv[1] threads and main meet at a barrier, then all call exit_group(0) at once. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

static pthread_barrier_t barrier;

static void *worker(void *arg)
{
    (void)arg;
    pthread_barrier_wait(&barrier);
    syscall(SYS_exit_group, 0);
    return NULL;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 8;
    pthread_barrier_init(&barrier, NULL, n + 1);
    pthread_t t;
    for (int i = 0; i < n; i++)
        pthread_create(&t, NULL, worker, NULL);
    usleep(50000);
    pthread_barrier_wait(&barrier);
    syscall(SYS_exit_group, 0);
    return 1;
}
