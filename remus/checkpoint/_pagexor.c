/*
 * remus.checkpoint._pagexor: the page loops of the delta encoder in one pass
 * each (remus/checkpoint/delta_encoder.py; the numpy code there is the
 * reference and the fallback, and tests/unit/test_pagexor.py holds both to the
 * same output).
 *
 * Why C: under load the encoder compared, gathered, XORed and counted each
 * changed page in five numpy passes with a temporary array each (profile at
 * 1000 busy connections: the sender's largest cost, with the page faults of
 * those temporaries), on the cores the protected service needs.
 *
 * Pages are 4096 bytes, seen as 512 little-endian u64 words. Row arguments
 * are C-contiguous buffers of whole pages; index arguments are int64 buffers.
 * The GIL is released while the loops run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PAGE_WORDS 512
#define PAGE_BYTES (PAGE_WORDS * 8)

static int get_rows(PyObject *obj, Py_buffer *view, Py_ssize_t *n, const char *what)
{
	if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0)
		return -1;
	if (view->len % PAGE_BYTES ||
	    (view->ndim >= 2 && view->shape[view->ndim - 1] * view->itemsize != PAGE_BYTES)) {
		PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not rows of whole pages", what,
			     view->len);
		PyBuffer_Release(view);
		return -1;
	}
	*n = view->len / PAGE_BYTES;
	return 0;
}

/*
 * A private copy of an int64 index array (new reference-free memory, freed
 * with PyMem_RawFree): the loops run without the GIL, and another thread may
 * write to the caller's array meanwhile; the copy is what was checked.
 */
static int64_t *get_index(PyObject *obj, Py_ssize_t *n, const char *what)
{
	Py_buffer view;
	int64_t *copy = NULL;

	if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
		return NULL;
	const char *f = view.format ? view.format : "B";
	char code = f[strlen(f) - 1];
	if (view.itemsize != 8 || (code != 'l' && code != 'q') || (f[0] == '>' || f[0] == '!')) {
		PyErr_Format(PyExc_TypeError, "%s: not an int64 array (format %s)", what, f);
		goto out;
	}
	*n = view.len / 8;
	copy = PyMem_RawMalloc(view.len ? view.len : 1);
	if (!copy) {
		PyErr_NoMemory();
		goto out;
	}
	memcpy(copy, view.buf, view.len);
out:
	PyBuffer_Release(&view);
	return copy;
}

/*
 * changed_rows(new, old, idx=None) -> bytes (int64 row numbers of new)
 *
 * Row i of new is changed when its version in old (row idx[i], or row i
 * without idx) differs, or when it has none (idx[i] < 0).
 */
static PyObject *changed_rows(PyObject *self, PyObject *args)
{
	PyObject *new_obj, *old_obj, *idx_obj = Py_None;
	Py_buffer nv, ov;
	Py_ssize_t n, nold, nidx = 0, k = 0;
	PyObject *out = NULL;
	int64_t *res = NULL, *idx = NULL;

	if (!PyArg_ParseTuple(args, "OO|O", &new_obj, &old_obj, &idx_obj))
		return NULL;
	if (get_rows(new_obj, &nv, &n, "new") < 0)
		return NULL;
	if (get_rows(old_obj, &ov, &nold, "old") < 0)
		goto out_new;
	if (idx_obj != Py_None) {
		idx = get_index(idx_obj, &nidx, "idx");
		if (!idx)
			goto out;
		if (nidx != n) {
			PyErr_Format(PyExc_ValueError, "idx has %zd entries for %zd rows", nidx, n);
			goto out;
		}
		for (Py_ssize_t i = 0; i < n; i++)
			if (idx[i] >= nold) {
				PyErr_Format(PyExc_IndexError, "idx[%zd] = %lld is past old's %zd rows", i,
					     (long long)idx[i], nold);
				goto out;
			}
	} else if (nold < n) {
		PyErr_Format(PyExc_ValueError, "old has %zd rows for %zd", nold, n);
		goto out;
	}
	res = PyMem_RawMalloc((n ? n : 1) * sizeof(int64_t));
	if (!res) {
		PyErr_NoMemory();
		goto out;
	}
	Py_BEGIN_ALLOW_THREADS
	const char *a = nv.buf, *b = ov.buf;
	for (Py_ssize_t i = 0; i < n; i++) {
		int64_t j = idx ? idx[i] : i;
		if (j < 0 || memcmp(a + i * PAGE_BYTES, b + j * PAGE_BYTES, PAGE_BYTES))
			res[k++] = i;
	}
	Py_END_ALLOW_THREADS
	out = PyBytes_FromStringAndSize((const char *)res, k * sizeof(int64_t));
out:
	PyMem_RawFree(res);
	PyMem_RawFree(idx);
	PyBuffer_Release(&ov);
out_new:
	PyBuffer_Release(&nv);
	return out;
}

/*
 * xor_sparse(rows, old, sel, base, dense_words) -> (dense, data, sparse_pages)
 *
 * For each k, page x = rows[sel[k]] XOR old[base[k]]. dense (bytes, one 0/1
 * per k): x has more than dense_words non-zero words (it goes out as it is).
 * data: the others as one KIND_PAGES_XOR body (remus.checkpoint.delta.
 * encode_xor): u32 count n, n u32 word positions over those pages laid end to
 * end, n u64 words. sparse_pages: how many pages data holds.
 */
static PyObject *xor_sparse(PyObject *self, PyObject *args)
{
	PyObject *rows_obj, *old_obj, *sel_obj, *base_obj;
	Py_ssize_t dense_words;
	Py_buffer rv, ov;
	Py_ssize_t nrows, nold, nsel = 0, nbase = 0;
	PyObject *out = NULL, *dense = NULL, *data = NULL;
	int64_t *sel = NULL, *base = NULL;
	uint32_t *pos = NULL;
	uint64_t *words = NULL;
	Py_ssize_t count = 0, sparse = 0;

	if (!PyArg_ParseTuple(args, "OOOOn", &rows_obj, &old_obj, &sel_obj, &base_obj, &dense_words))
		return NULL;
	if (dense_words < 0 || dense_words > PAGE_WORDS) {
		PyErr_SetString(PyExc_ValueError, "dense_words must be 0..512");
		return NULL;
	}
	if (get_rows(rows_obj, &rv, &nrows, "rows") < 0)
		return NULL;
	if (get_rows(old_obj, &ov, &nold, "old") < 0)
		goto out_rows;
	sel = get_index(sel_obj, &nsel, "sel");
	if (!sel)
		goto out;
	base = get_index(base_obj, &nbase, "base");
	if (!base)
		goto out;
	if (nsel != nbase) {
		PyErr_Format(PyExc_ValueError, "sel has %zd entries, base %zd", nsel, nbase);
		goto out;
	}
	for (Py_ssize_t k = 0; k < nsel; k++)
		if (sel[k] < 0 || sel[k] >= nrows || base[k] < 0 || base[k] >= nold) {
			PyErr_Format(PyExc_IndexError, "entry %zd (row %lld, base %lld) is outside the pages",
				     k, (long long)sel[k], (long long)base[k]);
			goto out;
		}
	/* word positions are u32; sizes below cannot overflow a 64-bit size_t */
	if ((uint64_t)nsel * PAGE_WORDS > UINT32_MAX) {
		PyErr_SetString(PyExc_ValueError, "too many pages for u32 word positions");
		goto out;
	}
	dense = PyBytes_FromStringAndSize(NULL, nsel);
	if (!dense)
		goto out;
	/* at most dense_words non-zero words per sparse page */
	pos = PyMem_RawMalloc((nsel * dense_words + 1) * sizeof(uint32_t));
	words = PyMem_RawMalloc((nsel * dense_words + 1) * sizeof(uint64_t));
	if (!pos || !words) {
		PyErr_NoMemory();
		goto out;
	}
	char *dn = PyBytes_AS_STRING(dense);
	Py_BEGIN_ALLOW_THREADS
	const uint64_t *r = rv.buf, *o = ov.buf;
	uint64_t x[PAGE_WORDS];
	for (Py_ssize_t k = 0; k < nsel; k++) {
		const uint64_t *p = r + sel[k] * PAGE_WORDS, *q = o + base[k] * PAGE_WORDS;
		Py_ssize_t nz = 0;
		for (int w = 0; w < PAGE_WORDS; w++) {
			x[w] = p[w] ^ q[w];
			nz += x[w] != 0;
		}
		if (nz > dense_words) {
			dn[k] = 1;
			continue;
		}
		dn[k] = 0;
		uint32_t off = (uint32_t)(sparse * PAGE_WORDS);
		for (int w = 0; w < PAGE_WORDS; w++)
			if (x[w]) {
				pos[count] = off + w;
				words[count++] = x[w];
			}
		sparse++;
	}
	Py_END_ALLOW_THREADS
	data = PyBytes_FromStringAndSize(NULL, 4 + 12 * count);
	if (!data)
		goto out;
	{
		char *d = PyBytes_AS_STRING(data);
		uint32_t c = (uint32_t)count;
		/* little-endian on the wire, like the numpy encoder's "<u4"/"<u8" */
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "remus.checkpoint._pagexor assumes a little-endian host"
#endif
		memcpy(d, &c, 4);
		memcpy(d + 4, pos, 4 * count);
		memcpy(d + 4 + 4 * count, words, 8 * count);
	}
	out = Py_BuildValue("(OOn)", dense, data, sparse);
out:
	PyMem_RawFree(sel);
	PyMem_RawFree(base);
	PyMem_RawFree(pos);
	PyMem_RawFree(words);
	Py_XDECREF(dense);
	Py_XDECREF(data);
	PyBuffer_Release(&ov);
out_rows:
	PyBuffer_Release(&rv);
	return out;
}

static PyMethodDef methods[] = {
	{"changed_rows", changed_rows, METH_VARARGS,
	 "changed_rows(new, old, idx=None) -> bytes of int64: the rows of new that differ from "
	 "their version in old (row idx[i], or i), or have none (idx[i] < 0)."},
	{"xor_sparse", xor_sparse, METH_VARARGS,
	 "xor_sparse(rows, old, sel, base, dense_words) -> (dense, data, sparse_pages): "
	 "rows[sel] XOR old[base]; pages with more than dense_words changed words are marked "
	 "dense, the others encoded as one KIND_PAGES_XOR body."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_pagexor", "The delta encoder's page loops (see _pagexor.c).", -1,
	methods,
};

PyMODINIT_FUNC PyInit__pagexor(void)
{
	return PyModule_Create(&module);
}
