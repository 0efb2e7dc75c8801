/*
 * Small getters for json-c objects from QEMU (and for qbk's own output).
 * Each returns a borrowed value, or a neutral one when the key is missing
 * or of another type, so that an answer of the wrong shape never reaches
 * json-c's assertions (its array functions abort on a non-array).
 */
#include "qmp.h"

const char *qmp_json_string(json_object *obj, const char *key)
{
    json_object *v;

    if (!obj || !json_object_object_get_ex(obj, key, &v) ||
        !json_object_is_type(v, json_type_string)) {
        return NULL;
    }
    return json_object_get_string(v);
}

gint64 qmp_json_int(json_object *obj, const char *key)
{
    json_object *v;

    return obj && json_object_object_get_ex(obj, key, &v)
               ? json_object_get_int64(v)
               : 0;
}

guint64 qmp_json_uint(json_object *obj, const char *key)
{
    json_object *v;

    return obj && json_object_object_get_ex(obj, key, &v)
               ? json_object_get_uint64(v)
               : 0;
}

bool qmp_json_bool(json_object *obj, const char *key)
{
    json_object *v;

    return obj && json_object_object_get_ex(obj, key, &v) &&
           json_object_get_boolean(v);
}

json_object *qmp_json_array(json_object *obj, const char *key)
{
    json_object *v;

    if (!obj || !json_object_object_get_ex(obj, key, &v) ||
        !json_object_is_type(v, json_type_array)) {
        return NULL;
    }
    return v;
}

size_t qmp_json_length(json_object *array)
{
    return json_object_is_type(array, json_type_array)
               ? json_object_array_length(array)
               : 0;
}

json_object *qmp_json_index(json_object *array, size_t i)
{
    return i < qmp_json_length(array) ? json_object_array_get_idx(array, i)
                                      : NULL;
}

void qmp_json_free(gpointer obj)
{
    json_object_put(obj);
}

void qmp_json_set_string(json_object *obj, const char *key, const char *value)
{
    json_object_object_add(obj, key,
                           value ? json_object_new_string(value) : NULL);
}

void qmp_json_set_int(json_object *obj, const char *key, gint64 value)
{
    json_object_object_add(obj, key, json_object_new_int64(value));
}

void qmp_json_set_uint(json_object *obj, const char *key, guint64 value)
{
    json_object_object_add(obj, key, json_object_new_uint64(value));
}

void qmp_json_set_bool(json_object *obj, const char *key, bool value)
{
    json_object_object_add(obj, key, json_object_new_boolean(value));
}

void qmp_json_set_double(json_object *obj, const char *key, double value)
{
    json_object_object_add(obj, key, json_object_new_double(value));
}
