/*
 * Sockets: unix stream sockets made once for every user (lib/qmp's
 * monitors, the servers we start), and the TCP options that both QEMU
 * clients need (lib/qmp, the copier).
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "util.h"

bool util_is_tcp(int fd)
{
    int domain = 0;
    socklen_t len = sizeof(domain);

    return getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 &&
           (domain == AF_INET || domain == AF_INET6);
}

void util_quick_ack(int fd)
{
    int one = 1;

    setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
}

int util_unix_socket(const char *path, UtilSocketRole role)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    struct sockaddr *sa = (struct sockaddr *)&addr;
    int fd;
    bool ok;

    if (strlen(path) >= sizeof(addr.sun_path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return -1;
    }
    if (role == UTIL_SOCKET_CONNECT) {
        ok = connect(fd, sa, sizeof(addr)) == 0;
    } else {
        ok = bind(fd, sa, sizeof(addr)) == 0 && listen(fd, 64) == 0;
    }
    if (!ok) {
        int saved = errno;

        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}
