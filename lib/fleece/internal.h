/*
 * Private to lib/fleece.
 */
#ifndef QBK_FLEECE_INTERNAL_H
#define QBK_FLEECE_INTERNAL_H

#include "fleece.h"

/* The scratch image of FD (made by fleece_create_scratch) added as
 * FD->scratch with OPTIONS (taken over) merged in. */
bool fleece_add_scratch(QmpClient *qmp, FleeceDisk *fd, json_object *options,
                        GError **error);

/* Make PT's user (a device or a pass-through filter) use NODE. */
bool fleece_set_user_child(QmpClient *qmp, const QmpInsertPoint *pt,
                           const char *node, GError **error);

/* block-export-add of NODE as NAME (ID), WRITABLE, with OPTIONS (taken
 * over, may be NULL) merged in. */
bool fleece_export_node(QmpClient *qmp, const char *id, const char *node,
                        const char *name, bool writable, json_object *options,
                        GError **error);

#endif /* QBK_FLEECE_INTERNAL_H */
