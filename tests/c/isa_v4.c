/* Linked with -Wl,-z,x86-64-v4 so its GNU property note needs x86-64-v4. */
int main(void) { return 0; }
