// The PKCS#11 interface as Debian's p11-kit ships it (libp11-kit-dev): the types, constants and
// the function list only. Modules are loaded at run time with dlopen (TokenKeys); nothing here
// links against a PKCS#11 library.
#include <p11-kit/pkcs11.h>
