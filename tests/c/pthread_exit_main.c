/* main calls pthread_exit while a worker runs; the worker's return makes the last
 * thread call exit(), with the thread-group leader already a zombie. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static void *worker(void *arg)
{
    (void)arg;
    usleep(200000);
    puts("worker done");
    return NULL;
}

int main(void)
{
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    pthread_exit(NULL);
}
