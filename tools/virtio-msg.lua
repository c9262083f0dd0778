-- Wireshark dissector for `ivshmem-bus monitor --pcap` captures (LINKTYPE_USER0, 147).
--
-- Each record: a 4-byte pseudo-header written by ivshmem_bus.monitor.PcapWriter
--   u8 direction (0 driver->device, 1 device->driver), u8 profile (0 qemu-v0, 1 spec-v1,
--   2 linux-v0), u16 reserved
-- then one virtio-msg message up to its msg_size (docs/wire-format.md §4.1, §5.1):
--   qemu-v0: type u8, msg_id u8, dev_num u16, msg_size u16, payload (little-endian)
--   spec-v1: type u8, msg_id u8, dev_num u16, token u16, msg_size u16, payload
--   linux-v0: as qemu-v0, dev_num being the device on the bus (docs/wire-format.md §12)
--
-- Install: copy to ~/.local/lib/wireshark/plugins/ or run
--   wireshark -X lua_script:tools/virtio-msg.lua capture.pcap

local p = Proto("virtio_msg", "virtio-msg over ivshmem")

local directions = { [0] = "driver->device", [1] = "device->driver" }
local profiles = { [0] = "qemu-v0", [1] = "spec-v1", [2] = "linux-v0" }
local transport_ids = {
  [0x02] = "DEVICE_INFO", [0x03] = "GET_FEATURES", [0x04] = "SET_FEATURES",
  [0x05] = "GET_CONFIG", [0x06] = "SET_CONFIG", [0x07] = "GET_DEVICE_STATUS",
  [0x08] = "SET_DEVICE_STATUS", [0x09] = "GET_VQUEUE", [0x0a] = "SET_VQUEUE",
  [0x0b] = "RESET_VQUEUE", [0x0c] = "GET_SHM", [0x40] = "EVENT_CONFIG",
  [0x41] = "EVENT_AVAIL", [0x42] = "EVENT_USED", [0x80] = "IOMMU_ENABLE",
  [0x81] = "IOMMU_TRANSLATE",
}
local bus_ids = { [0x02] = "GET_DEVICES", [0x03] = "PING", [0x40] = "EVENT_DEVICE" }

local f = {
  direction = ProtoField.uint8("virtio_msg.direction", "Direction", base.DEC, directions),
  profile = ProtoField.uint8("virtio_msg.profile", "Profile", base.DEC, profiles),
  type = ProtoField.uint8("virtio_msg.type", "Type", base.HEX),
  response = ProtoField.bool("virtio_msg.type.response", "Response", 8, nil, 0x01),
  bus = ProtoField.bool("virtio_msg.type.bus", "Bus message", 8, nil, 0x02),
  msg_id = ProtoField.uint8("virtio_msg.msg_id", "Message id", base.HEX),
  dev_num = ProtoField.uint16("virtio_msg.dev_num", "Device number", base.DEC),
  token = ProtoField.uint16("virtio_msg.token", "Token", base.DEC),
  msg_size = ProtoField.uint16("virtio_msg.msg_size", "Message size", base.DEC),
  payload = ProtoField.bytes("virtio_msg.payload", "Payload"),
  u32 = ProtoField.uint32("virtio_msg.u32", "u32", base.HEX),
}
p.fields = f

function p.dissector(buf, pinfo, tree)
  if buf:len() < 4 then return 0 end
  local direction = buf(0, 1):uint()
  local profile = buf(1, 1):uint()
  local hsize = (profile == 1) and 8 or 6
  pinfo.cols.protocol = "virtio-msg"
  local t = tree:add(p, buf(), "virtio-msg (" .. (profiles[profile] or "?") .. ")")
  t:add(f.direction, buf(0, 1))
  t:add(f.profile, buf(1, 1))
  local msg = buf(4)
  if msg:len() < hsize then
    pinfo.cols.info = "truncated"
    return buf:len()
  end
  local mtype = msg(0, 1):uint()
  local id = msg(1, 1):uint()
  local tt = t:add(f.type, msg(0, 1))
  tt:add(f.response, msg(0, 1))
  tt:add(f.bus, msg(0, 1))
  t:add(f.msg_id, msg(1, 1))
  t:add_le(f.dev_num, msg(2, 2))
  if profile == 1 then t:add_le(f.token, msg(4, 2)) end
  t:add_le(f.msg_size, msg(hsize - 2, 2))
  local names = (bit.band(mtype, 2) ~= 0) and bus_ids or transport_ids
  local name = names[id] or string.format("UNKNOWN 0x%02x", id)
  if bit.band(mtype, 1) ~= 0 then name = name .. " response" end
  if msg:len() > hsize then
    local pl = t:add(f.payload, msg(hsize))
    for off = 0, msg:len() - hsize - 4, 4 do
      pl:add_le(f.u32, msg(hsize + off, 4)):prepend_text(string.format("@%d ", off))
    end
  end
  pinfo.cols.info = (directions[direction] or "?") .. " " .. name
  return buf:len()
end

DissectorTable.get("wtap_encap"):add(wtap.USER0, p)
