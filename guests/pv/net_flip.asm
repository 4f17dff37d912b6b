; net_flip: the netfront of net.asm receiving by page flipping. It writes request-rx-copy = 0,
; so the backend does not copy into our rx pages: each rx buffer is a grant with
; GTF_accept_transfer, and the backend transfers a whole page of its own onto it (the page
; changes owner; our frame is backed by Dom0's page, our old page goes to Dom0). The guest
; finds the frame in the grant entry once GTF_transfer_completed is set, reads the packet
; there, and offers the buffer again.
%define RX_FLIP 1
%include "pv/net.asm"
