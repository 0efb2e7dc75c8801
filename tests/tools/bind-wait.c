/*
 * qbk-test-bind-wait PATH MS: bind a unix socket at PATH without listening,
 * for MS milliseconds, then remove it. A server that binds before it
 * listens looks like this for a moment; tests stretch that moment (see
 * tests/tools/slow-qemu-nbd).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    int fd;

    if (argc != 3 || strlen(argv[1]) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "usage: qbk-test-bind-wait PATH MS\n");
        return 2;
    }
    strcpy(addr.sun_path, argv[1]);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        perror(argv[1]);
        return 1;
    }
    usleep((useconds_t)atoi(argv[2]) * 1000);
    close(fd);
    unlink(argv[1]);
    return 0;
}
