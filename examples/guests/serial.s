# serial.s — a polling driver for the 16550 UART at COM1 (0x3f8), 64-bit.
#
# Included by the example guests (.include "serial.s").  Calling convention:
# argument in rdi (and rsi), result in rax; every routine preserves all
# registers except rax.
#
#   serial_putc  dil          send one byte (waits for LSR.THRE)
#   serial_puts  rdi -> str   send a NUL-terminated string
#   serial_dec   rdi          send rdi as unsigned decimal
#   serial_hex   rdi          send rdi as 0x-prefixed hexadecimal
#   serial_getc  -> al        wait for LSR.DR, read one byte
#   serial_gets  rdi=buf, rsi=size -> rax=length   read a line (without '\n')

.equ COM1,     0x3f8
.equ UART_LSR, COM1 + 5
.equ LSR_DR,   0x01          # a received byte is waiting
.equ LSR_THRE, 0x20          # the transmit register is empty

serial_putc:
    push rdx
    mov  dx, UART_LSR
1:  in   al, dx              # poll the line status register ...
    test al, LSR_THRE
    jz   1b                  # ... until the transmitter can take a byte
    mov  dx, COM1
    mov  al, dil
    out  dx, al
    pop  rdx
    ret

serial_puts:
    push rdi
    push rsi
    mov  rsi, rdi
1:  lodsb
    test al, al
    jz   2f
    movzx edi, al
    call serial_putc
    jmp  1b
2:  pop  rsi
    pop  rdi
    ret

serial_dec:                  # digits are pushed least significant first, then sent
    push rdi
    push rcx
    push rdx
    mov  rax, rdi
    mov  rcx, 10
    push -1                  # end marker
1:  xor  edx, edx
    div  rcx
    push rdx
    test rax, rax
    jnz  1b
2:  pop  rdi
    cmp  rdi, -1
    je   3f
    add  edi, '0'
    call serial_putc
    jmp  2b
3:  pop  rdx
    pop  rcx
    pop  rdi
    ret

serial_hex:
    push rdi
    push rcx
    push rdx
    mov  rdx, rdi
    mov  edi, '0'
    call serial_putc
    mov  edi, 'x'
    call serial_putc
    mov  ecx, 60             # skip leading zero nibbles (keep the last one)
1:  cmp  ecx, 0
    je   2f
    mov  rax, rdx
    shr  rax, cl
    test al, 0xf
    jnz  2f
    sub  ecx, 4
    jmp  1b
2:  mov  rax, rdx
    shr  rax, cl
    and  eax, 0xf
    lea  rdi, [rip + hexdigits]
    movzx edi, byte ptr [rdi + rax]
    call serial_putc
    sub  ecx, 4
    jge  2b
    pop  rdx
    pop  rcx
    pop  rdi
    ret
hexdigits: .ascii "0123456789abcdef"

serial_getc:
    push rdx
    mov  dx, UART_LSR
1:  in   al, dx
    test al, LSR_DR
    jz   1b                  # nothing received yet: poll again
    mov  dx, COM1
    in   al, dx
    pop  rdx
    ret

serial_gets:
    push rdi
    push rcx
    xor  ecx, ecx
1:  cmp  rcx, rsi
    jae  2f
    call serial_getc
    cmp  al, '\n'
    je   2f
    mov  [rdi + rcx], al
    inc  rcx
    jmp  1b
2:  mov  rax, rcx
    pop  rcx
    pop  rdi
    ret
