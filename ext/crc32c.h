/* CRC-32C (Castagnoli): SSE4.2's crc32 instruction when the CPU has it (checked at run time, so
   the build stays portable), else slice-by-8 tables. */
#ifndef TIDEGATE_CRC32C_H
#define TIDEGATE_CRC32C_H
#include <stdint.h>
#include <stddef.h>
#include <string.h>

static uint32_t tg_crc_tables[8][256];
static int tg_crc_hw = -1;

static void tg_crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ ((c & 1) ? 0x82F63B78u : 0);
        tg_crc_tables[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            tg_crc_tables[t][i] = (tg_crc_tables[t - 1][i] >> 8) ^ tg_crc_tables[0][tg_crc_tables[t - 1][i] & 0xFF];
#if defined(__x86_64__) && defined(__GNUC__)
    tg_crc_hw = __builtin_cpu_supports("sse4.2");
#else
    tg_crc_hw = 0;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("sse4.2")))
static uint32_t tg_crc_hw_run(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = crc;
    while (n >= 8) { uint64_t v; memcpy(&v, p, 8); c = __builtin_ia32_crc32di(c, v); p += 8; n -= 8; }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

static uint32_t tg_crc32c(const unsigned char *p, size_t n, uint32_t crc) {
    crc = ~crc;
#if defined(__x86_64__) && defined(__GNUC__)
    if (tg_crc_hw) return ~tg_crc_hw_run(crc, p, n);
#endif
    while (n >= 8) {
        uint64_t v; memcpy(&v, p, 8);
        v ^= crc;
        crc = tg_crc_tables[7][v & 0xFF] ^ tg_crc_tables[6][(v >> 8) & 0xFF] ^ tg_crc_tables[5][(v >> 16) & 0xFF] ^
              tg_crc_tables[4][(v >> 24) & 0xFF] ^ tg_crc_tables[3][(v >> 32) & 0xFF] ^
              tg_crc_tables[2][(v >> 40) & 0xFF] ^ tg_crc_tables[1][(v >> 48) & 0xFF] ^ tg_crc_tables[0][v >> 56];
        p += 8; n -= 8;
    }
    while (n--) crc = tg_crc_tables[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}
#endif
