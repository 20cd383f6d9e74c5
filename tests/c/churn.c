/* Threads come and go while the process ends with _exit: threads die while stopped in
 * the supervisor's hands, whose ptrace calls on them then fail with ESRCH. */
#include <pthread.h>
#include <unistd.h>

static void *spin(void *unused)
{
    (void)unused;
    for (;;) {
        pthread_t t;
        if (pthread_create(&t, NULL, spin, NULL) == 0)
            pthread_detach(t);
        usleep(100);
    }
    return NULL;
}

int main(void)
{
    pthread_t t;
    pthread_create(&t, NULL, spin, NULL);
    usleep(20000);
    _exit(0);
}
