/*
 * Private to lib/bitmap.
 */
#ifndef QBK_BITMAP_INTERNAL_H
#define QBK_BITMAP_INTERNAL_H

#include "bitmap.h"

/* {node, name}: the argument of most bitmap actions (new object). */
json_object *bitmap_ref(const QmpDisk *disk, const char *name);

#endif /* QBK_BITMAP_INTERNAL_H */
