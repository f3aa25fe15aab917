/* tf-dlg loopback shim for TFF's worker_binary (LD_PRELOAD into the worker only).
 *
 * 1. bind(): an any-address (0.0.0.0, ::) becomes loopback, so the unauthenticated
 *    executor service is reachable from this machine only. An IPv6 socket bound to ::
 *    becomes ::ffff:127.0.0.1 (dual-stack, IPv4 loopback) so that clients dialling
 *    127.0.0.1 or localhost still connect; a V6ONLY socket becomes ::1.
 * 2. A constructor sets PR_SET_PDEATHSIG(SIGKILL) and starts a watchdog thread that
 *    exits the worker when its parent (TF_DLG_WORKER_PARENT) is gone: pdeathsig fires
 *    when the parent *thread* that forked exits, the watchdog covers the parent
 *    process dying before the constructor ran or a fork from a short-lived thread.
 * Compiled by tf_dlg/federated/worker.py: cc -shared -fPIC -O2 shim.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static bind_fn real_bind = NULL;
  if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
  if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
    struct sockaddr_in a;
    memcpy(&a, addr, sizeof(a));
    if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      return real_bind(fd, (struct sockaddr *)&a, sizeof(a));
    }
  } else if (addr && addr->sa_family == AF_INET6 &&
             len >= sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 a;
    memcpy(&a, addr, sizeof(a));
    if (IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr)) {
      int v6only = 0;
      socklen_t optlen = sizeof(v6only);
      getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &optlen);
      if (v6only) {
        a.sin6_addr = in6addr_loopback;
      } else {
        inet_pton(AF_INET6, "::ffff:127.0.0.1", &a.sin6_addr);
      }
      return real_bind(fd, (struct sockaddr *)&a, sizeof(a));
    }
  }
  return real_bind(fd, addr, len);
}

static pid_t watched_parent = 0;

static void *watchdog(void *unused) {
  (void)unused;
  for (;;) {
    if (getppid() != watched_parent) _exit(137);
    usleep(200000);
  }
  return NULL;
}

__attribute__((constructor)) static void tf_dlg_shim_init(void) {
  const char *parent = getenv("TF_DLG_WORKER_PARENT");
  if (!parent || !*parent) return;
  watched_parent = (pid_t)atol(parent);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != watched_parent) _exit(137);
  pthread_t thread;
  if (pthread_create(&thread, NULL, watchdog, NULL) == 0) pthread_detach(thread);
}
