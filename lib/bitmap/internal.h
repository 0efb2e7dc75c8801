/*
 * Private to lib/bitmap.
 */
#ifndef QBK_BITMAP_INTERNAL_H
#define QBK_BITMAP_INTERNAL_H

#include "bitmap.h"

#define BITMAP_PREFIX "qbk-"
#define SEQ_DIGITS    6 /* qbk-000001-NAME */
#define SEQ_MAX       999999

/* {node, name}: the argument of most bitmap actions (new object; names.c). */
json_object *bitmap_ref(const QmpDisk *disk, const char *name);

#endif /* QBK_BITMAP_INTERNAL_H */
